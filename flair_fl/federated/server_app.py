"""The ServerApp: Flower's entry point on the server, running `round.run_rounds`."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from flair_fl.federated.contract import ServerStrategy
from flair_fl.federated.round import AfterRound, LoopOutcome, OnFedEval, RoundPlan, run_rounds
from flair_fl.privacy.stages import RoundPrivacy


def make_server_app(
    strategy: ServerStrategy,
    privacy: RoundPrivacy,
    initial_arrays: ArrayRecord,
    plan: RoundPlan,
    after_round: AfterRound,
    outcome: LoopOutcome,
    on_fed_eval: OnFedEval | None = None,
    start_round: int = 1,
) -> ServerApp:
    """A ServerApp running `run_rounds`; results and errors land in `outcome`."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_rounds(
                grid,
                strategy,
                privacy,
                initial_arrays,
                plan,
                after_round,
                on_fed_eval,
                outcome,
                start_round,
            )
        except BaseException as err:  # surfaced to the caller after the simulation ends
            outcome.error = err
            raise
        finally:
            plan.transport.close()

    return app
