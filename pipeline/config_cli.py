"""`--config FILE.yaml` for a click command whose options are the fields of a settings dataclass.

    @main.command("train")
    @config_file_option(TrainConfig, help="...")
    @config_options                                  # one option per field
    @click.pass_context
    def train(ctx, **options):
        options = with_stage_block(ctx, options)     # a recipe's block for the chosen --stage

The file's settings become the options' defaults (click's default_map), so the order is: the dataclass default,
then the file, then the file's block for the chosen --stage (recipes/), then the command line. A flag given on the
command line always wins; a key the file leaves out keeps its one default, on the dataclass field. The file is
read and checked by pipeline/config_file.py (errors with line and nearest name) before click converts anything.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import click
from click.core import ParameterSource

from pipeline.config_file import ConfigFile, ConfigFileError, leaves, read_config_file

META_KEY = "genrecal.config_file"
# where a value counts as given by the user, so a file's stage block must not replace it
GIVEN = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)


def config_file_option(cls: type, help: str, skip: frozenset[str] = frozenset(),
                       choices: Mapping[str, Sequence] | None = None, only: frozenset[str] | None = None):
    """The eager `--config FILE` option of a command whose options are `cls`'s fields (nested ones flattened).
    `only`: the settings that become this command's option defaults (the rest are read by the command itself,
    through `loaded_config`); default: all."""

    def load(ctx: click.Context, param: click.Parameter, path: str | None):
        if path is None:
            return None
        try:
            loaded = read_config_file(path, cls, skip=skip, choices=choices)
            defaults = option_defaults(loaded.values, ctx.command, only)
        except ConfigFileError as err:
            raise click.BadParameter(str(err), ctx, param) from None
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
        ctx.meta[META_KEY] = loaded
        return path

    return click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), is_eager=True,
                        expose_value=False, callback=load, help=help)


def loaded_config(ctx: click.Context) -> ConfigFile | None:
    """The file --config read for this command, None without --config."""
    return ctx.meta.get(META_KEY)


def option_defaults(nested: dict, command: click.Command, only: frozenset[str] | None = None) -> dict:
    """Option name -> value of the settings in `nested` (a field `x` is option `x`, or `no_x` inverted)."""
    params = {p.name for p in command.params}
    out = {}
    for place, value in leaves(nested).items():
        name = place.rpartition(".")[2]
        if only is not None and name not in only:
            continue
        if name in params:
            out[name] = value
        elif f"no_{name}" in params:
            out[f"no_{name}"] = not value
        elif only is None:
            raise ConfigFileError(f"{place} is a setting but not an option of `{command.name}`")
    return out


def with_stage_block(ctx: click.Context, options: dict, stage_option: str = "stage") -> dict:
    """`options` with the --config file's block for the chosen stage laid over every option the user did not
    give on the command line (its values converted by the option's own type, as the file's top level is)."""
    loaded = loaded_config(ctx)
    if loaded is None or options.get(stage_option) not in loaded.stages:
        return options
    params = {p.name: p for p in ctx.command.params}
    out = dict(options)
    try:
        block = option_defaults(loaded.stages[options[stage_option]], ctx.command)
    except ConfigFileError as err:
        raise click.UsageError(str(err)) from None
    for name, value in block.items():
        if ctx.get_parameter_source(name) not in GIVEN:
            out[name] = params[name].type_cast_value(ctx, value)
    return out
