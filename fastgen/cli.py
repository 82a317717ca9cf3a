"""The ``fastgen`` command.

- ``fastgen serve [MODEL] [--host 127.0.0.1 --port 8000 --replicas N --tensor-parallel N ...]``: the
  HTTP gateway (MII and OpenAI-compatible routes). One replica without tensor parallelism runs the
  engine in this process; otherwise a persistent deployment is started and stopped with the command
  (``--ray [--ray-address ADDR]``: its replicas on the nodes of a Ray cluster).
- ``fastgen generate [MODEL] "prompt" [--max-new-tokens N --temperature T ...]``: stream one
  completion to the terminal. MODEL may also name a running deployment.
- ``fastgen snapshot [MODEL] OUT [--tensor-parallel N --quantization fp8 --dtype ...]``: write the
  engine's ready-to-run weights for those options to the new directory OUT, which then loads as a
  MODEL (see `fastgen.models.snapshot`).

MODEL is a Hugging Face model directory, a GGUF file or a snapshot; without one, the default model
(SmolLM2-135M-Instruct, see `fastgen.models.default`). A model that cannot be loaded is reported in
one line on stderr, with exit code 1.

Other commands plug in through `COMMANDS` (name -> function adding a subparser).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastgen.serving.guard import HttpPolicy

SUPPRESS = argparse.SUPPRESS

# flags whose name is not the field's (``--<field-name>``, ``--no-<field-name>`` for a switch)
_FLAG_NAMES = {"enable_prefix_caching": "--no-prefix-caching"}


def _add_engine_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag for every `EngineConfig` field, with the field's own documentation as its help.
    A switch turns off a field that is on by default (``--no-cuda-graphs``); a flag that is not
    given leaves the field's default."""
    from fastgen.config import EngineConfig, field_docs

    group = parser.add_argument_group("engine (EngineConfig fields)")
    docs = field_docs(EngineConfig)
    hints = typing.get_type_hints(EngineConfig)
    defaults = EngineConfig()
    for field in EngineConfig.__struct_fields__:
        default = getattr(defaults, field)
        kind, optional = _base_type(hints[field])
        doc = _help(docs.get(field, ""))
        if kind is bool:
            flag = _FLAG_NAMES.get(field, f"--{'no-' if default else ''}{field.replace('_', '-')}")
            options: dict[str, Any] = dict(action="store_const", const=not default)
            help_text = f"{'turn off' if default else 'turn on'}: {doc}"
        else:
            flag = _FLAG_NAMES.get(field, f"--{field.replace('_', '-')}")
            options = dict(type=_value_parser(kind, optional), metavar=_METAVARS.get(kind, "TEXT"))
            shown = "unset" if default is None else ",".join(map(str, default)) if kind is list else default
            unset = "; none unsets it" if optional and default is not None else ""
            help_text = f"{doc} (default: {shown}{unset})"
        if flag not in skip:  # an absent flag leaves no attribute: the field keeps its default
            group.add_argument(flag, dest=f"engine_{field}", help=help_text, default=SUPPRESS, **options)


_METAVARS: dict[type, str] = {int: "N", float: "X", list: "N,N,..."}


def _base_type(hint: Any) -> tuple[type, bool]:
    """(the type a value of ``hint`` has, whether None is allowed): ``int | None`` is (int, True)."""
    members = [member for member in typing.get_args(hint) if member is not type(None)]
    if typing.get_origin(hint) is list:
        return list, False
    if members:  # a union with None
        return _base_type(members[0])[0], True
    return hint, False


def _value_parser(kind: type, optional: bool) -> Callable[[str], Any]:
    """Reads a flag's text: ``none`` is None for an optional field, lists are comma-separated ints."""

    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        if kind is list:
            return [int(item) for item in text.split(",") if item.strip()]
        return kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _help(doc: str) -> str:
    """A field's documentation as plain text for ``--help`` (no reST quotes; % escaped)."""
    return doc.replace("``", "").replace("`", "").replace("%", "%%")


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    prefix = "engine_"
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix)}


def _run(coroutine) -> Any:
    from fastgen.loops import new_event_loop  # uvloop when installed

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coroutine)


# -- fastgen serve ---------------------------------------------------------------------------------


def _add_serve(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="serve a model over HTTP (MII and OpenAI-compatible routes)")
    parser.add_argument("model", nargs="?", default=None, help=_MODEL_HELP)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (0: a free one)")
    parser.add_argument("--replicas", type=int, default=1, help="engine processes behind a load balancer")
    parser.add_argument(
        "--device-map",
        default=None,
        help="the GPUs of each replica's ranks, as MII's device_map: auto, or JSON such as 0, [0,1] "
        "(one replica) or [[0,1],[2,3]] (one list per replica)",
    )
    parser.add_argument("--served-model-name", default=None, help="the model's name in the API")
    parser.add_argument("--log-level", default="warning")
    _add_ray_options(parser)
    _add_http_options(parser)
    _add_engine_options(parser)
    parser.set_defaults(func=_serve)


def _add_http_options(parser: argparse.ArgumentParser) -> None:
    from fastgen.serving.guard import DEFAULT_MAX_BODY_BYTES, LOCAL_HOSTS

    group = parser.add_argument_group("HTTP access (see fastgen.serving.guard)")
    group.add_argument(
        "--allowed-hosts",
        type=_names,
        default=(),
        help=f"Host names served besides {', '.join(LOCAL_HOSTS)} and the bound address "
        "(comma-separated; name or name:port; * for any)",
    )
    group.add_argument(
        "--allowed-origins",
        type=_names,
        default=(),
        help="web origins that may call the API from a browser, e.g. https://app.example (comma-separated; "
        "* for any; default: none but the server's own host)",
    )
    group.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body (default {DEFAULT_MAX_BODY_BYTES}); larger ones get 413",
    )


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Ray cluster (pip install 'fastgen[ray]'; see the README)")
    group.add_argument(
        "--ray",
        action="store_true",
        help="place each replica on a node of a Ray cluster (this host keeps the gateway)",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        help="the cluster to join (default: RAY_ADDRESS, else the one `ray start` made on this host, "
        "else a private one)",
    )
    group.add_argument(
        "--ray-router-port",
        type=int,
        default=0,
        help="the port of this host that replicas on other nodes dial (default: a free one)",
    )


def _cluster(args: argparse.Namespace) -> Any:
    """``--ray`` and its options as `fastgen.serve`'s ``cluster`` argument."""
    if not args.ray:
        if args.ray_address is not None or args.ray_router_port:
            raise ValueError("--ray-address and --ray-router-port need --ray")
        return "local"
    from fastgen.serving.ray_placement import RayCluster

    return RayCluster(address=args.ray_address, router_port=args.ray_router_port)


def _names(value: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip())


def _http_policy(args: argparse.Namespace) -> HttpPolicy:
    from fastgen.serving.guard import LOCAL_HOSTS, HttpPolicy

    return HttpPolicy(
        allowed_hosts=(*LOCAL_HOSTS, *args.allowed_hosts),
        allowed_origins=args.allowed_origins,
        max_body_bytes=args.max_body_bytes,
    ).serving(args.host)


def _serve(args: argparse.Namespace) -> int:
    from fastgen.serving.device_map import parse_device_map, replica_device_ids

    options = _engine_options(args)
    device_map = None if args.device_map is None else parse_device_map(args.device_map)
    cluster = _cluster(args)
    if cluster != "local" or args.replicas > 1 or options.get("tensor_parallel", 1) > 1:
        return _serve_deployment(args, options, device_map, cluster)
    lists = replica_device_ids(device_map, tensor_parallel=1, replica_num=1)  # checked here too
    if lists is not None:
        if options.get("device_ids") is not None:
            raise ValueError("give --device-map or --device-ids, not both")
        options["device_ids"] = lists[0]
    return _run(_serve_in_process(args, options))


async def _serve_in_process(args: argparse.Namespace, options: dict[str, Any]) -> int:
    from fastgen.config import EngineConfig
    from fastgen.serving.backend import EngineBackend
    from fastgen.serving.gateway import create_app
    from fastgen.serving.http_server import HttpServer
    from fastgen.serving.replica import engine_down

    engine = await _start_engine(args.model, EngineConfig.from_options(**options))
    try:
        backend = EngineBackend(engine, args.served_model_name)
        policy = _http_policy(args)
        app = create_app(backend, policy=policy)
        server = HttpServer(app, args.host, args.port, log_level=args.log_level, policy=policy)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.stop)
        print(f"fastgen: serving {backend.model_names[0]!r} on {server.url}", file=sys.stderr, flush=True)
        serving = asyncio.ensure_future(server.serve())
        failing = asyncio.ensure_future(engine_down(engine))
        await asyncio.wait({serving, failing}, return_when=asyncio.FIRST_COMPLETED)
        if not failing.done():
            failing.cancel()
            return serving.result() or 0
        # nothing restarts an engine in this process: exit, for whatever supervises it to restart it
        print(f"fastgen: the engine cannot serve ({failing.result()}); exiting", file=sys.stderr, flush=True)
        server.stop()
        await asyncio.wait({serving}, timeout=10)
        return 1
    finally:
        await engine.stop()


def _serve_deployment(
    args: argparse.Namespace, options: dict[str, Any], device_map: Any = None, cluster: Any = "local"
) -> int:
    from fastgen.serving.launcher import serve
    from fastgen.supervisor import pid_alive

    tensor_parallel = options.pop("tensor_parallel", 1)
    client = serve(
        args.model,
        deployment_name=args.served_model_name,
        tensor_parallel=tensor_parallel,
        replica_num=args.replicas,
        enable_restful_api=True,
        restful_api_port=args.port,
        restful_api_host=args.host,
        restful_api_policy=_http_policy(args),
        device_map=device_map,
        cluster=cluster,
        **options,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"fastgen: deployment {client.name!r} ({args.replicas} replicas) serving on {client.info.http_url}",
        file=sys.stderr,
        flush=True,
    )
    try:
        while not stop.wait(1.0):
            if not pid_alive(client.info.server_pid):
                print("fastgen: the deployment's server exited", file=sys.stderr)
                return 1
    finally:
        client.terminate_server()
    return 0


# -- fastgen generate --------------------------------------------------------------------------------


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="stream one completion to the terminal",
        description="Stream one completion to the terminal: `fastgen generate PROMPT` (the model of "
        "--model, else the default model) or `fastgen generate MODEL PROMPT`.",
    )
    parser.add_argument(
        "first", metavar="MODEL_OR_PROMPT", help="the prompt, or the model when PROMPT follows"
    )
    parser.add_argument("prompt", nargs="?", default=None, metavar="PROMPT")
    parser.add_argument("-m", "--model", default=None, help=f"{_MODEL_HELP}, or a running deployment's name")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--sampling-seed", type=int, default=None, help="seed of this request")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send the prompt as a user message through the model's chat template (default: on when "
        "a local model's tokenizer has a chat template; off for a deployment); --no-chat sends raw text",
    )
    _add_engine_options(parser, skip=("--seed",))
    parser.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from fastgen.sampling_params import SamplingParams

    if args.prompt is None:
        args.prompt = args.first
    elif args.model is None:
        args.model = args.first
    else:
        raise ValueError("generate takes MODEL PROMPT or --model MODEL PROMPT, not both models")
    params = SamplingParams.from_options(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature != 0,
        temperature=args.temperature if args.temperature != 0 else 1.0,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
        ignore_eos=args.ignore_eos,
    )
    return _run(_stream_to_terminal(args, params))


async def _stream_to_terminal(args: argparse.Namespace, params) -> int:
    from fastgen.serving.backend import EngineBackend
    from fastgen.serving.prompts import ChatMessage, ChatPrompt

    chat = args.chat
    if args.model is None or Path(args.model).exists():
        from fastgen.config import EngineConfig

        engine = await _start_engine(args.model, EngineConfig.from_options(**_engine_options(args)))
        backend: Any = EngineBackend(engine)
        if chat is None:
            chat = getattr(engine.tokenizer, "chat_template", None) is not None
    else:
        from fastgen.errors import DeploymentNotFoundError, ModelNotFoundError
        from fastgen.serving.client import client

        try:
            engine, backend = None, client(args.model)
        except DeploymentNotFoundError as exc:
            raise ModelNotFoundError(
                f"{args.model!r} is not a model directory, a .gguf file or a running deployment; {exc}"
            ) from None
    prompt: Any = ChatPrompt([ChatMessage("user", args.prompt)]) if chat else args.prompt
    try:
        started = time.perf_counter()
        output = None
        async for output in backend.stream_outputs(prompt, params):
            sys.stdout.write(output.text)
            sys.stdout.flush()
        elapsed = time.perf_counter() - started
        sys.stdout.write("\n")
        if output is not None:
            rate = output.generated_tokens / elapsed if elapsed > 0 else 0.0
            summary = f"{output.prompt_tokens} prompt tokens, {output.generated_tokens} generated"
            print(
                f"[{summary} in {elapsed:.2f} s ({rate:.1f} tokens/s), finish: {output.finish_reason}]",
                file=sys.stderr,
            )
    finally:
        if engine is not None:
            await engine.stop()
    return 0


# -- fastgen snapshot --------------------------------------------------------------------------------


def _add_snapshot(subparsers) -> None:
    parser = subparsers.add_parser(
        "snapshot",
        help="write a model as the engine holds it (per-rank shards, FP8 when quantized) for fast loading",
        description="Write MODEL (default: SmolLM2-135M-Instruct) to the new directory OUT as the engine "
        "holds it for the options given: one safetensors file of weights per tensor-parallel rank, in "
        "the engine's layout (fused projections, FP8 values and scales with --quantization fp8), with "
        "the config, tokenizer and a manifest of hashes. OUT then loads as a MODEL anywhere (serve, "
        "generate, pipeline, AsyncEngine.start) with the same --tensor-parallel, --dtype and "
        "--quantization; the other engine options do not shape the weights and are not recorded.",
    )
    parser.add_argument(
        "first", metavar="MODEL_OR_OUT", help="the output directory, or MODEL when OUT follows"
    )
    parser.add_argument("out", nargs="?", default=None, metavar="OUT", help="a new (or empty) directory")
    _add_engine_options(parser)
    parser.set_defaults(func=_snapshot)


def _snapshot(args: argparse.Namespace) -> int:
    from fastgen.models.snapshot import read_manifest, snapshot

    model, out = (None, args.first) if args.out is None else (args.first, args.out)
    started = time.perf_counter()
    try:
        written = snapshot(model, out, **_engine_options(args))
    except FileExistsError as exc:  # OUT is taken
        print(f"fastgen: error: {exc}", file=sys.stderr)
        return 1
    manifest = read_manifest(written)
    options = ", ".join(f"{name}={value}" for name, value in manifest.options.items())
    size_gb = sum(rank.size for rank in manifest.ranks) / 1e9
    print(
        f"fastgen: snapshot of {manifest.source} written to {written} ({options}; {size_gb:.2f} GB of "
        f"weights in {len(manifest.ranks)} file(s), {time.perf_counter() - started:.1f} s)",
        file=sys.stderr,
    )
    return 0


# -- loading -----------------------------------------------------------------------------------------

_MODEL_HELP = "a Hugging Face model directory, a .gguf file or a snapshot (default: SmolLM2-135M-Instruct)"


async def _start_engine(model: str | None, config: Any) -> Any:
    """`AsyncEngine.start`, with whatever stops the model from loading (a corrupt file, a shape
    that does not fit, ...) reported as one `ModelLoadError` line rather than a traceback."""
    from fastgen.engine import AsyncEngine
    from fastgen.errors import FastgenError, ModelLoadError

    try:
        return await AsyncEngine.start(model, config)
    except FastgenError:
        raise
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [""])[0]
        name = model if model is not None else "the default model"
        raise ModelLoadError(f"cannot load {name}: {type(exc).__name__}: {reason}") from exc


# -- entry point -------------------------------------------------------------------------------------

COMMANDS: dict[str, Callable[[Any], None]] = {
    "serve": _add_serve,
    "generate": _add_generate,
    "snapshot": _add_snapshot,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastgen", description="fastgen: an embeddable LLM inference engine"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "warning").upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    from fastgen.errors import FastgenError

    try:
        return args.func(args)
    except (FastgenError, ValueError) as exc:
        print(f"fastgen: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
