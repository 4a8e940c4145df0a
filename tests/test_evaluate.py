"""scripts/evaluate.py with and without N-best LLM rescoring (``--llm``), end to end on the demo corpus with the
tiny random LLaMA: both WERs are written, the rescored pick is argmax a + λ·l of the N-best (recomputed here from
the search and the LLM host directly), λ = 0 keeps the acoustic top, and bad settings name the option."""

import importlib.util
import json

import pytest
import torch
from conftest import REPO

from nemo_ctcllm.decoding.llm_rerank import audio_batches
from nemo_ctcllm.decoding.nbest import ctc_prefix_beam_search
from nemo_ctcllm.evaluate import normalize_text, score

NBEST = 4


def _script():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def nemo_file(tiny_nemo_file):
    return tiny_nemo_file


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _expected_picks(model, host, manifest, lm_weight):
    """argmax_n a_n + λ·l_n per utterance, from the N-best search and ``host.score`` (no cache, no gathering)."""
    picks = []
    with torch.no_grad():
        for signal, lens, _ in audio_batches(manifest, batch_size=4):
            log_probs, enc_len, _ = model.forward(input_signal=signal, input_signal_length=lens)
            nb = ctc_prefix_beam_search(log_probs, enc_len, beam_size=NBEST, nbest=NBEST)
            for b in range(signal.shape[0]):
                n_valid = int(nb.valid[b].sum())
                texts = [model.tokenizer.ids_to_text(nb.ids[b, n, : nb.lengths[b, n]].tolist()) for n in range(n_valid)]
                total = nb.scores[b, :n_valid] + lm_weight * host.score(texts, add_eos=True).float()
                picks.append(texts[int(total.argmax())])
    return picks


def test_evaluate_with_and_without_llm_rescoring(nemo_file, tiny_llm, demo_corpus, tmp_path, llm_process_group):
    main = _script().main
    plain = main(
        [
            "--model",
            nemo_file,
            "--manifest",
            demo_corpus["dev"],
            "--out-dir",
            str(tmp_path / "plain"),
            "--batch-size",
            "4",
        ]
    )
    runs = {}
    for lam in (0.0, 2.0):
        out = tmp_path / f"llm{lam}"
        runs[lam] = main(
            [
                "--model",
                nemo_file,
                "--manifest",
                demo_corpus["dev"],
                "--out-dir",
                str(out),
                "--batch-size",
                "4",
                "--llm",
                tiny_llm,
                "--nbest",
                str(NBEST),
                "--llm-weight",
                str(lam),
            ]
        )
        summary = json.loads((out / "summary.json").read_text())["dev_manifest"]
        assert summary == json.loads(json.dumps(runs[lam]["dev_manifest"]))
        # the greedy scores are those of a run without --llm; the rescored ones sit beside them
        assert {k: summary[k] for k in ("wer", "cer", "utterances")} == {
            k: plain["dev_manifest"][k] for k in ("wer", "cer", "utterances")
        }
        rescored = summary["llm_rescored"]
        assert rescored["nbest"] == NBEST and rescored["llm_weight"] == lam and rescored["utterances"] == 8
        rows = _rows(out / "dev_manifest.predictions.jsonl")
        assert len(rows) == 8 and all("pred_text_llm" in r for r in rows)
        assert rescored["wer"] == pytest.approx(score(rows, "pred_text_llm")["wer"])
        runs[lam] = rows

    from nemo.collections.asr.models import ASRModel

    from nemo_ctcllm.llm import LLMHost

    model = ASRModel.restore_from(nemo_file, map_location="cpu").eval()
    host = LLMHost(tiny_llm, tp_size=1)
    for lam, rows in runs.items():
        assert [r["pred_text_llm"] for r in rows] == _expected_picks(model, host, demo_corpus["dev"], lam), lam
    # the tiny LLM's preferences move the pick on some utterance (else the test above would not tell λ apart)
    assert [r["pred_text_llm"] for r in runs[0.0]] != [r["pred_text_llm"] for r in runs[2.0]]
    assert all(normalize_text(r["text"]) for r in runs[0.0])


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--nbest", "0", "argument --nbest: must be an integer >= 1, got 0"),
        ("--llm-weight", "nan", "argument --llm-weight: must be a finite number, got nan"),
    ],
)
def test_bad_rescoring_settings_name_the_option(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        _script().main(["--model", "m.nemo", "--manifest", "m.json", "--llm", "x", flag, value])
    assert message in capsys.readouterr().err


def test_library_call_checks_settings_before_decoding():
    from nemo_ctcllm.evaluate import evaluate

    with pytest.raises(ValueError, match="--nbest must be an integer >= 1, got 0"):
        evaluate(torch.nn.Linear(1, 1), "unused.json", llm_host=object(), nbest=0)
