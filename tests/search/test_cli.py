from __future__ import annotations

import json

from search.cli import main


def test_backbones_json_lists_every_backbone_with_the_promised_keys(capsys):
    assert main(["backbones", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert {"resnet18", "vgg16_bn", "alexnet", "efficientnet_b7", "efficientnet",
            "efficientnet_lite0"} <= set(by_name)
    for row in rows:
        assert set(row) == {"name", "stages", "params", "gmacs", "resolution", "weights"}
    assert by_name["resnet18"]["stages"] == 5 and by_name["resnet18"]["params"] == 11_689_512
    assert abs(by_name["resnet18"]["gmacs"] - 1.814) < 0.01
    assert by_name["efficientnet_lite0"]["weights"] == ["packaged"]


def test_backbones_table(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["name", "stages", "params"]
    assert any(line.startswith("efficientnet_lite0") and "packaged" in line for line in out)


def test_every_command_of_the_grammar_has_a_handler():
    from search.cli import _COMMANDS
    from search.cliargs import build_parser

    parser = build_parser("ftsearch")
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) == set(_COMMANDS)
