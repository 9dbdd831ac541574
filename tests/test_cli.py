"""The command line: listings, one-line errors, check, layout rules."""
from __future__ import annotations

import json
from pathlib import Path

from bench.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_ls_datasets_json_lists_the_paper_sets_and_demo(capsys):
    assert main(["ls", "datasets", "--json"]) == 0
    cards = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    counted = {name: len(cards[name]["miou_class_ids"]) for name in
               ["bedroom_28", "ffhq_34", "cat_15", "horse_21", "celeba_19", "ade_bedroom_30"]}
    assert counted == {"bedroom_28": 28, "ffhq_34": 34, "cat_15": 15, "horse_21": 21, "celeba_19": 19,
                       "ade_bedroom_30": 30}
    assert "demo" in cards
    for card in cards.values():
        assert {"name", "aliases", "num_classes", "ignore_label", "miou_class_ids", "train", "test"} <= set(card)


def test_ls_backbones(capsys):
    assert main(["ls", "backbones"]) == 0
    assert "pixels" in capsys.readouterr().out


def test_user_mistake_is_one_line_not_a_traceback(capsys):
    assert main(["run", "--backbone", "pixles", "--dataset", "demo", "--seeds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench: error:") and "did you mean 'pixels'" in err[0]
    assert main(["run", "--backbone", "pixels", "--dataset", "cat16", "--seeds", "0"]) == 2
    assert "cat" in capsys.readouterr().err


def test_report_on_empty_folder(tmp_path, capsys):
    assert main(["report", "--out", str(tmp_path)]) == 0
    assert "no results" in capsys.readouterr().out


def test_check_runs_the_contract_and_a_four_image_evaluation(tmp_path, capsys):
    assert main(["check", "--backbone", "pixels", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "contract: OK" in out and "4-image demo evaluation" in out


def test_data_folders_are_not_python_packages():
    # A package named `datasets` would shadow HuggingFace datasets.
    assert not (REPO / "datasets" / "__init__.py").exists()
    assert not (REPO / "reports" / "__init__.py").exists()
