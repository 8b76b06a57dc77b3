"""Click pieces shared by the commands that take a cache: a folder or an object-store URL, `--storage-option`
and `--cache-dir-local`. Both options act when parsed (they set this process's storage settings) and reach no
command function, so no credential ever lands in a config object, a saved config.yaml or a log line.

    @main.command("verify")
    @click.argument("cache", type=CacheLocation())
    @storage_options
    def verify_command(cache): ...
"""

from __future__ import annotations

import click

from pipeline.store.backend import is_url, parse_storage_options, set_storage_options
from pipeline.store.storage import StorageError

STORAGE_OPTION_HELP = (
    "Object-store setting KEY=VALUE (repeatable), e.g. endpoint=http://host:9000, region=eu-west-1, "
    "access_key_id=..., secret_access_key=...; the same names as obstore's S3/GCS/Azure config. Default: the "
    "environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...). Held in memory only, never written.")
CACHE_DIR_LOCAL_HELP = (
    "Local folder that keeps what is downloaded from an object-store cache (the teacher head, keyed by its "
    "sha256; whole shards up to --cache-dir-local-bytes) for later runs and epochs. Default: a temporary "
    "folder removed at exit.")


class CacheLocation(click.ParamType):
    """A cache: an object-store URL (s3://, gs://, az://) as given, else a folder (that must exist if `exists`)."""

    name = "FOLDER|URL"

    def __init__(self, exists: bool = True):
        self.folder = click.Path(exists=exists, file_okay=False)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and is_url(value):
            return value
        return self.folder.convert(value, param, ctx)


def _set_options(ctx, param, pairs):
    try:
        set_storage_options(parse_storage_options(pairs))
    except StorageError as err:
        raise click.BadParameter(str(err)) from None


def _set_local_cache(ctx, param, folder):
    from pipeline.store.local_cache import set_local_cache_dir

    set_local_cache_dir(folder)


def storage_options(fn):
    """--storage-option KEY=VALUE (repeatable), applied when parsed."""
    return click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
                        expose_value=False, callback=_set_options, help=STORAGE_OPTION_HELP)(fn)


def local_cache_options(fn):
    """--cache-dir-local FOLDER and --cache-dir-local-bytes N, applied when parsed."""
    from pipeline.store.local_cache import set_local_cache_limit

    def set_limit(ctx, param, value):
        set_local_cache_limit(value)

    fn = click.option("--cache-dir-local-bytes", type=click.IntRange(min=0), default=None, expose_value=False,
                      callback=set_limit, help="Bound of --cache-dir-local in bytes (default: 20 GiB); the least "
                      "recently used shards go first.")(fn)
    return click.option("--cache-dir-local", type=click.Path(file_okay=False), default=None, expose_value=False,
                        callback=_set_local_cache, help=CACHE_DIR_LOCAL_HELP)(fn)
