"""The pure parts of embeddings: the vector encoding both sides hash, the network's recount of
input tokens, the spot check's judgement, the advert's task and routing by it."""

from __future__ import annotations

import base64
import random
import struct

import pytest

from coordinator.services.metering import recount, recount_inputs
from coordinator.services.routing import Preferences, RouteRequest, route
from coordinator.services.spot_judgement import CheckPolicy, cosine, judge_vectors
from protocol.advert import EMBED, Advert, ModelOffer
from protocol.completions import EMBEDDINGS, Output, vector_of, vector_text
from protocol.errors import MalformedMessage
from tests.coordinator.test_routing import Offer


def test_a_vector_is_openais_base64_of_little_endian_float32_either_way() -> None:
    floats = [0.5, -1.25, 0.375, 7.0]  # exact in float32
    expected = base64.b64encode(struct.pack("<4f", *floats)).decode()
    assert vector_text(floats) == expected
    assert vector_text(expected) == expected  # base64 from the engine is kept as it came
    assert vector_of(expected) == floats
    assert vector_of("not base64!") == []


def test_an_embeddings_response_is_read_as_one_vector_per_input_in_index_order() -> None:
    out = Output()
    out.add(EMBEDDINGS, {
        "data": [{"index": 1, "embedding": [2.0, 0.0]}, {"index": 0, "embedding": [1.0, 1.0]}],
        "usage": {"prompt_tokens": 9, "total_tokens": 9},
    }, streamed=False)  # fmt: skip
    assert out.vectors() == [[1.0, 1.0], [2.0, 0.0]]
    assert out.token_counts() == (9, 0)
    assert out.produced


class Tokens:
    """A tokenizer that adds a BOS and makes one token per word."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1] * add_special_tokens + [7] * len(text.split())

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        raise AssertionError("embeddings decode nothing")

    def apply_chat_template(self, conversation: object, **kwargs: object) -> object:
        raise AssertionError("embeddings have no chat template")


@pytest.mark.parametrize(
    ("inputs", "tokens"),
    [("a b c", 4), (["a b", "c"], 5), ([5, 6, 7], 3), ([[5, 6], [7]], 3)],
)
def test_input_tokens_are_recounted_per_input_as_the_engine_encodes_them(
    inputs: object, tokens: int
) -> None:
    assert recount_inputs(Tokens(), inputs) == tokens
    counted = recount(Tokens(), EMBEDDINGS, inputs, None, Output())
    assert counted is not None
    assert (counted.prompt_tokens, counted.completion_tokens) == (tokens, 0)


def test_vectors_pass_only_when_each_points_where_the_references_does() -> None:
    rng = random.Random(3)
    reference = [[rng.gauss(0, 1) for _ in range(64)] for _ in range(3)]
    noisy = [[x * 1.001 + 1e-5 for x in v] for v in reference]
    policy = CheckPolicy()
    assert judge_vectors(noisy, reference, policy).genuine
    made_up = [[rng.gauss(0, 1) for _ in range(64)] for _ in range(3)]
    assert judge_vectors([*noisy[:2], made_up[2]], reference, policy).off == 1
    assert not judge_vectors(noisy[:2], reference, policy).genuine  # one vector missing
    assert not judge_vectors([], [], policy).genuine
    assert cosine([1.0, 0.0], [0.0, 0.0]) == 0.0


def test_the_task_is_signed_only_when_it_is_embed_and_unknown_tasks_are_refused() -> None:
    plain = ModelOffer("m", 1, 10, 20)
    embed = ModelOffer("e", 1, 10, 0, task=EMBED)
    advert = Advert("node", 1, (plain, embed))
    data = advert.to_bytes()
    assert data.count(b'"task"') == 1  # earlier coordinators read the generation offer as-is
    assert Advert.from_bytes(data).offer("e") == embed
    with pytest.raises(MalformedMessage, match="task"):
        ModelOffer("x", 1, 10, 20, task="rerank")


def test_routing_sends_a_request_only_to_offers_of_its_task() -> None:
    embedder = Offer("embedder", 10, 0, task=EMBED)
    generator = Offer("generator", 10, 20)
    pool = [embedder, generator]
    vectors = route(RouteRequest("m", 10, 0, task=EMBED), pool, {}, Preferences(),
                    random.Random(0), 0.0)  # fmt: skip
    assert [c.node_id for c in vectors.ranked] == ["embedder"]
    assert vectors.excluded == {"wrong_task": 1}
    chat = route(RouteRequest("m", 10, 10), pool, {}, Preferences(), random.Random(0), 0.0)
    assert [c.node_id for c in chat.ranked] == ["generator"]
    older = Offer("older", 10, 20, takes_batches=False)  # signs no batch prices
    lines = route(RouteRequest("m", 10, 10, batch=True), [generator, older], {}, Preferences(),
                  random.Random(0), 0.0)  # fmt: skip
    assert [c.node_id for c in lines.ranked] == ["generator"]
    assert lines.excluded == {"no_batch_price": 1}
    assert [c.node_id for c in chat.ranked] == ["generator"]
