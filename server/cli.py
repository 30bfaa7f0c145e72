"""`deltaserve`: one console script, one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import types
import typing
from pathlib import Path
from typing import Any

from deltastore.cli import add_commands
from deltastore.clihelp import Parser
from deltastore.hub import is_hub_id, offline, resolve_ref
from server.clients.evaluate import add_command as add_eval
from server.clients.loadtest import add_command as add_loadtest
from server.config import Settings

log = logging.getLogger(__name__)


def _field_type(annotation: Any) -> Any:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and args:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        return str
    return annotation


class _NoSecrets(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        env = "DELTASERVE_" + self.dest.upper()
        parser.error(
            f"{option} is not taken on the command line (other users see it in ps): "
            f"set {env} or use {option}-file"
        )


def add_serve(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="start the OpenAI-compatible server",
        description="Serve the base and every delta in the store over an OpenAI-compatible "
        "HTTP API. Each flag overrides its DELTASERVE_<NAME> environment variable.",
    )
    s.add_argument(
        "model",
        nargs="?",
        help="the base model, as vllm serve takes it (a directory or a Hub id org/name): "
        "the same as --base",
    )
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("secret"):  # never on argv (ps shows it)
            s.add_argument(flag, action=_NoSecrets, nargs="?", help=argparse.SUPPRESS)
            continue
        kind = _field_type(info.annotation)
        env = f"DELTASERVE_{name.upper()}"
        default = (
            info.default.get_secret_value()
            if hasattr(info.default, "get_secret_value")
            else info.get_default(call_default_factory=True)
        )
        shown = "none" if default in (None, []) else default
        help_ = f"{info.description} [env {env}; default {shown}]"
        if typing.get_origin(kind) is list:  # several values: --flag A B (vLLM's form)
            item = typing.get_args(kind)[0]
            metavar = extra.get("metavar") if isinstance(extra, dict) else None
            s.add_argument(flag, nargs="+", default=None, type=item, metavar=metavar, help=help_)
            continue
        if kind is bool:
            s.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
            continue
        choices = (
            typing.get_args(info.annotation)
            if typing.get_origin(info.annotation) is typing.Literal
            else None
        )
        s.add_argument(
            flag,
            default=None,
            choices=choices,
            help=help_,
            type=Path if kind is Path else int if kind is int else float if kind is float else str,
        )
    ray = s.add_argument_group("scale-out on Ray Serve (pip install 'ray[serve]')")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve multiplexing")
    ray.add_argument("--replicas", type=int, default=2, help="replicas, each with its own base")
    ray.add_argument(
        "--max-variants-per-replica",
        type=int,
        default=4,
        help="variants one replica holds (Ray's multiplexing LRU)",
    )
    ray.add_argument(
        "--ray-address",
        default=None,
        help="an existing cluster (auto, ray://host:10001); default: start a local one",
    )
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from deltastore.demo import install_demos
    from deltastore.embedded import ensure_embedded_base
    from deltastore.store import DeltaStore
    from server.adapters import install_lora_modules
    from server.app import check_servable, create_app

    overrides = {
        n: getattr(args, n)
        for n in Settings.model_fields
        if getattr(args, n, None) is not None and n not in ("admin_token", "api_keys")
    }
    if args.model is not None:  # `deltaserve serve org/name`, as `vllm serve org/name`
        if args.base is not None:
            raise ValueError(f"give the base once: {args.model} or --base {args.base}")
        overrides["base"] = Path(args.model)
    settings = Settings(**overrides)
    check_base(settings)
    if settings.base is not None and settings.base.expanduser().is_dir():
        check_servable(settings.base.expanduser())  # a model the engine does not serve
    sock = None
    if not args.ray:  # the port first: a busy one fails at once, before any loading
        try:
            sock = listen(settings.host, settings.port)
        except OSError as e:
            print(
                f"deltaserve serve: error: cannot listen on {settings.host}:{settings.port}: "
                f"{e.strerror or e}",
                file=sys.stderr,
            )
            return 1
        log.info("listening on %s", http_url(settings.host, sock.getsockname()[1]))
    if args.ray or sock is None:  # each replica loads the base: fetch it once first
        if settings.base is None:
            base_dir = ensure_embedded_base()
            if settings.demo:
                install_demos(base_dir, DeltaStore(settings.store))
        else:
            base_dir = resolve_ref(settings.base, settings.revision)
        if settings.lora_modules:  # compressed once, before the replicas read the store
            install_lora_modules(settings, base_dir, DeltaStore(settings.store))
        update = {"base": base_dir, "revision": None, "served_model_name": settings.served_name()}
        return serve_on_ray(settings.model_copy(update=update), args)
    # the port answers at once: /health is live, /ready says what is loading; the
    # embedded base is fetched and the demos are made in the background
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="info"))
    server.run(sockets=[sock])
    return 0


def check_base(settings: Settings) -> None:
    """A --base that can never load fails at once: neither a path nor a Hub id, or a
    Hub id not in the cache while HF_HUB_OFFLINE is set (online, the download runs in
    the background while the port answers)."""
    if settings.base is None or settings.base.expanduser().exists():
        return
    if not is_hub_id(str(settings.base)) or offline():
        resolve_ref(settings.base, settings.revision)  # raises, saying why


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket for uvicorn (SO_REUSEADDR, as uvicorn sets it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve_on_ray(settings: Settings, args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve

        from server.ray_serve import build_app
    except ImportError as e:
        raise RuntimeError("--ray needs Ray Serve: pip install 'ray[serve]'") from e
    ray.init(address=args.ray_address)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = build_app(settings, args.replicas, args.max_variants_per_replica)
    serve.run(app, name="deltaserve", route_prefix="/", blocking=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltaserve",
        description="Serve many fine-tunes of one base model as sparse DARE/DAREx deltas.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"deltaserve {_version()}")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        parser_class=Parser,
    )
    add_commands(sub)
    add_serve(sub)
    add_loadtest(sub)
    add_eval(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deltaserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        print(f"deltaserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
