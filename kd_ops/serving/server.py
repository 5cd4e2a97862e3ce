"""Run the app on uvicorn: load first (errors before the port opens), commit everything at shutdown."""

from __future__ import annotations

import asyncio
import gc

from kd_ops.serving.app import create_app
from kd_ops.serving.hosts import host_policy
from kd_ops.serving.state import ServerState, ServeSettings, masked


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Load the model and open the store (errors raise `ConfigError` before the port opens), then run
    until SIGINT/SIGTERM; in-flight requests finish and every answered prediction is committed."""
    import uvicorn

    allowed = host_policy(host, settings.allowed_hosts)  # first: a wildcard --host without names fails at once
    state = ServerState.start(settings)
    config = uvicorn.Config(
        create_app(state, allowed),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=30,
    )

    async def main() -> None:
        await state.open_log()
        try:
            served = state.current
            print(
                f"kd-ops: serving {served.name} v{served.version} (@{served.alias}) on http://{host}:{port}"
                f"\n  prediction log: {masked(settings.store) if state.log else 'off'}"
                f"\n  Host header: {'any' if allowed is None else ', '.join(sorted(allowed))} (any port)"
                f"\n  alias checked every {settings.poll_interval_s:g} s;"
                f" shadow teacher on {settings.shadow_fraction:.0%} of requests",
                flush=True,
            )
            # Everything loaded so far (torch, MLflow, the model) lives as long as the server: keep it
            # out of the collector's full passes, which otherwise pause every request for ~0.3 s.
            gc.collect()
            gc.freeze()
            await uvicorn.Server(config).serve()
        finally:
            await state.aclose()

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(main())
