"""Which JSON library for the token path: decode one engine SSE chunk, encode one client chunk.

    .venv/bin/python bench/encoders.py   # -> bench/results/encoders.json

The worker decodes every engine chunk; the coordinator encodes one string per frame into a
prebuilt chunk template. orjson is measured only if it is installed (it is not a dependency).
"""

from __future__ import annotations

import json
import timeit
from pathlib import Path
from typing import Any

import msgspec

CHUNK = (
    b'{"id":"cmpl-abc123","object":"chat.completion.chunk","created":1733040000,"model":"tiny",'
    b'"choices":[{"index":0,"delta":{"content":" hello"},"logprobs":null,"finish_reason":null,'
    b'"stop_reason":null,"token_ids":[1234]}],"prompt_token_ids":null}'
)
TEXT = " hello world foo"
HEAD = b'data: {"id":"chatcmpl-abc","object":"chat.completion.chunk","created":1,"model":"m",'
TAIL = b'},"logprobs":null,"finish_reason":null}]}\n\n'
WHOLE: dict[str, Any] = {
    "id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1733040000, "model": "m",
    "choices": [{"index": 0, "delta": {"content": TEXT}, "logprobs": None,
                 "finish_reason": None}],
}  # fmt: skip
N = 200_000


def _us(fn: Any) -> float:
    return round(min(timeit.repeat(fn, number=N, repeat=3)) / N * 1e6, 3)


def main() -> None:
    decode, encode = msgspec.json.Decoder().decode, msgspec.json.Encoder().encode
    results = {
        "decode_chunk_us": {"json": _us(lambda: json.loads(CHUNK)),
                            "msgspec": _us(lambda: decode(CHUNK))},
        "encode_chunk_us": {"json": _us(lambda: json.dumps(WHOLE, separators=(",", ":"))),
                            "msgspec": _us(lambda: encode(WHOLE))},
        "template_chunk_us": {"msgspec": _us(lambda: HEAD + encode(TEXT) + TAIL)},
    }  # fmt: skip
    try:
        import orjson

        results["decode_chunk_us"]["orjson"] = _us(lambda: orjson.loads(CHUNK))
        results["encode_chunk_us"]["orjson"] = _us(lambda: orjson.dumps(WHOLE))
        results["template_chunk_us"]["orjson"] = _us(lambda: HEAD + orjson.dumps(TEXT) + TAIL)
    except ImportError:
        pass
    out = Path(__file__).resolve().parent / "results" / "encoders.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
