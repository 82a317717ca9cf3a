"""A persistent deployment (2 replicas) and a client in another process, over ZeroMQ.

    python examples/zmq_remote_client.py [MODEL_DIR]

Without MODEL_DIR a tiny random model is built on the fly (runs on a CPU). The deployment
outlives the process that started it until `terminate_server()`; any process on this machine
can reach it by name with `fastgen.client(name)`.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile

import fastgen

NAME = "zmq-example"


def remote_client(name: str) -> None:
    """What another process does: find the deployment by name, generate, stream."""
    client = fastgen.client(name)
    for response in client.generate(["DeepSpeed is", "Seattle is"], max_new_tokens=16):
        print(f"generate: {response.generated_text!r} ({response.finish_reason})")

    async def stream() -> None:
        print("stream:   ", end="")
        async for delta in client.astream("the engine", max_new_tokens=16):
            print(delta.generated_text, end="", flush=True)
        print()

    asyncio.run(stream())
    print("replicas:", [(r.pid, r.requests_routed) for r in client.deployment_info().replicas])


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--client":
        remote_client(sys.argv[2])
        return
    model = sys.argv[1] if len(sys.argv) > 1 else None
    if model is None:
        from fastgen.toy import make_toy_checkpoint

        model = str(make_toy_checkpoint(tempfile.mkdtemp(prefix="fastgen-toy-")))
    client = fastgen.serve(model, deployment_name=NAME, replica_num=2)
    try:
        subprocess.run([sys.executable, __file__, "--client", NAME], check=True)
    finally:
        client.terminate_server()


if __name__ == "__main__":
    main()
