"""Backend `instant`: answers at once without a model, to measure everything but the model.

Choice queries get equal probabilities for every label; generate queries get `{}`.
"""

from __future__ import annotations

from daemon.config import ModelSettings
from daemon.hookspecs import hookimpl
from daemon.plugin_api import (
    Answer,
    ChoiceAnswer,
    ChoiceQuery,
    ModelRequest,
    TextAnswer,
)


class InstantBackend:
    image_factor = 28

    def __init__(self, settings: ModelSettings) -> None:
        self.model_name = "instant"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def run(self, request: ModelRequest) -> Answer:
        query = request.query
        if isinstance(query, ChoiceQuery):
            share = 1.0 / len(query.choices)
            return ChoiceAnswer(
                dict.fromkeys(query.choices, share), dict.fromkeys(query.choices, 0.0)
            )
        return TextAnswer("{}")


@hookimpl
def register_backends(register):
    register("instant", InstantBackend)
