from __future__ import annotations

from pathlib import Path

import pytest

from worker_node.config import discovering, dump, load, parse
from worker_node.errors import ConfigError

NODE = {"coordinator": "127.0.0.1:50051", "key": "/tmp/k", "state_dir": "/tmp/s"}


def test_round_trip_through_toml(tmp_path: Path) -> None:
    config = parse(
        {
            "node": NODE,
            "models": [
                {"name": "a", "model": "/models/a", "price_in": 5, "lora_adapters": {"x": "/l"}},
                {"name": "b", "engine": "attach", "url": "http://127.0.0.1:8000/v1"},
            ],
        }
    )
    path = tmp_path / "worker.toml"
    dump(config, path)
    assert load(path) == config
    assert "[[models]]" in path.read_text()


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ([{"name": "a"}], "needs `model`"),
        ([{"name": "a", "engine": "attach"}], "needs `url`"),
        ([{"name": "a", "model": "m", "price_in": -1}], "models.0.price_in"),
        ([{"name": "a", "model": "m", "colour": "red"}], "models.0.colour"),
        ([{"name": "a", "model": "m"}, {"name": "a", "model": "n"}], "same name"),
        ([], "models"),
    ],
)
def test_invalid_config_is_one_clear_line(models: list[dict[str, object]], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"node": NODE, "models": models}, "worker.toml")
    text = str(info.value)
    assert message in text
    assert text.startswith("worker.toml: ")
    assert "\n" not in text


def test_bad_coordinator_address_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"node\.coordinator"):
        parse(
            {
                "node": {**NODE, "coordinator": "no port here"},
                "models": [{"name": "a", "model": "m"}],
            }
        )


def test_missing_and_broken_files_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="agora worker init"):
        load(tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(broken)


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"key": "/tmp/k"}, "give `coordinator` (host:port) or set `discover = true`"),
        ({"key": "/tmp/k", "discover": True}, "needs at least one `bootstrap` peer"),
        ({**NODE, "discover": True, "bootstrap": ["/ip4/1.2.3.4/tcp/4001/p2p/x"]},
         "either `coordinator` or `discover`"),
    ],
)  # fmt: skip
def test_where_to_connect_is_one_clear_choice(node: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse({"node": node, "models": [{"name": "a", "model": "m"}]})


def test_a_discovering_node_needs_no_coordinator_address() -> None:
    boot = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWLPBTWKczk9M47pkyEYE9bLbmaozEMnWQaxMgveATetFa"
    config = parse({"node": {"key": "/tmp/k", "discover": True, "bootstrap": [boot]},
                    "models": [{"name": "a", "model": "m"}]})  # fmt: skip
    assert config.node.coordinator is None
    assert config.node.max_coordinators == 3


def test_start_discover_turns_a_configured_node_into_a_discovering_one() -> None:
    config = parse({"node": NODE, "models": [{"name": "a", "model": "m"}]})
    boot = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooWLPBTWKczk9M47pkyEYE9bLbmaozEMnWQaxMgveATetFa"
    found = discovering(config, [boot])
    assert (found.node.coordinator, found.node.discover, found.node.bootstrap) == (
        None,
        True,
        [boot],
    )
    assert found.models == config.models
    with pytest.raises(ConfigError, match=r"--discover: .*bootstrap"):
        discovering(config, [])  # nothing configured to bootstrap from
