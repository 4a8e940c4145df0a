"""scripts/pseudo_label.py and nemo_ctcllm.pseudo_label on real demo speech with a tiny model and the tiny random
LLaMA: the labels follow their rule (greedy = NeMo's own transcription; with an LLM argmax a + λ·l over the N-best
and the greedy transcript), the confidence is the stated posterior, the reference text is never read, a killed run
resumes to the same output, shards merge to the unsharded output, the filter keeps what it says, and bad input
names its file and line."""

import importlib.util
import json
import shutil

import pytest
import torch
from conftest import REPO

from nemo_ctcllm import pseudo_label as pl
from nemo_ctcllm.data.manifest import resolve_audio_path
from nemo_ctcllm.decoding.nbest import ctc_prefix_beam_search, sequence_log_probs

SETTINGS = ["--nbest", "4", "--batch-size", "3", "--block-size", "4", "--llm-batch-size", "5", "--no-progress"]


def _script():
    spec = importlib.util.spec_from_file_location("pseudo_label_script", REPO / "scripts" / "pseudo_label.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def teacher(tiny_nemo_file):
    """A tiny random model (its labels are noise, but not empty: enough to test the mechanics)."""
    return tiny_nemo_file


@pytest.fixture(scope="module")
def pool(demo_corpus, tmp_path_factory):
    """Train + dev lines (32 utterances, 8 blocks of 4), with their text (to show it is never read)."""
    out = tmp_path_factory.mktemp("pool") / "pool.json"
    lines = []
    for split in ("train", "dev"):
        for line in open(demo_corpus[split], encoding="utf-8"):
            e = json.loads(line)
            e["audio_filepath"] = resolve_audio_path(e["audio_filepath"], demo_corpus[split])
            lines.append(json.dumps(e) + "\n")
    out.write_text("".join(lines))
    return str(out)


@pytest.fixture(scope="module")
def llm_run(teacher, tiny_llm, pool, tmp_path_factory, llm_process_group):
    out = tmp_path_factory.mktemp("llm_run")
    summary = _script()(["--model", teacher, "--manifest", pool, "--out-dir", str(out), "--llm", tiny_llm, *SETTINGS])
    return out, summary


def _manifest(folder):
    return (folder / pl.MANIFEST).read_text()


def test_llm_labels_are_the_argmax_and_confidence_the_posterior(teacher, tiny_llm, pool, llm_run):
    from nemo_ctcllm.llm import LLMHost

    out, summary = llm_run
    rows = pl.collect(str(out), summary["utterances"], 4, 1)
    model = pl.load_teacher(teacher)
    host = LLMHost(tiny_llm, tp_size=1)
    utts = pl.read_inputs([pool])
    assert summary["utterances"] == len(utts) == 32
    changed = 0
    for u, row in zip(utts, rows):
        sig = torch.tensor(__import__("soundfile").read(u.audio, dtype="float32")[0])[None]
        with torch.no_grad():
            lp, ln, _ = model.forward(input_signal=sig, input_signal_length=torch.tensor([sig.shape[1]]))
            nb = ctc_prefix_beam_search(lp, ln, beam_size=4, nbest=4)
            g_ids, g_len = pl.greedy_ids(lp, ln)
            g_a = float(sequence_log_probs(lp, ln, g_ids[:, None], g_len[:, None])[0, 0])
        cands = {}
        for n in range(int(nb.valid[0].sum())):
            cands.setdefault(
                model.tokenizer.ids_to_text(nb.ids[0, n, : nb.lengths[0, n]].tolist()),
                (float(nb.scores[0, n]), int(nb.lengths[0, n])),
            )
        greedy = model.tokenizer.ids_to_text(g_ids[0, : g_len[0]].tolist())
        cands.setdefault(greedy, (g_a, int(g_len[0])))
        texts = list(cands)
        lm = host.score(texts, add_eos=True).float().tolist()
        total = [cands[t][0] + 0.5 * s for t, s in zip(texts, lm)]
        best = max(range(len(texts)), key=lambda c: total[c])
        assert row["label"] == texts[best]
        z = torch.tensor([s / max(1, cands[t][1]) for s, t in zip(total, texts)], dtype=torch.float64)
        assert pl.confidence(row) == pytest.approx(float(torch.softmax(z, 0)[best]), abs=2e-5)
        assert pl.confidence(row, 0.5) == pytest.approx(float(torch.softmax(2 * z, 0)[best]), abs=2e-5)
        changed += texts[best] != greedy
    assert changed > 0  # the LLM did re-rank some utterances (else this test would not tell the rule apart)
    lines = [json.loads(x) for x in _manifest(out).splitlines()]
    assert {x["pl_source"] for x in lines} == {"llm"}
    assert set(lines[0]) >= {"audio_filepath", "duration", "text", "pl_confidence", "pl_source"}
    assert "against_manifest_text" in json.loads((out / pl.SUMMARY).read_text())


def test_greedy_labels_are_nemos_transcription_and_text_is_never_read(teacher, pool, tmp_path):
    main = _script()
    main(["--model", teacher, "--manifest", pool, "--out-dir", str(tmp_path / "a"), *SETTINGS])
    # the same audio with its text replaced, and with no text at all: the same labels
    for name, edit in (
        ("b", lambda e: {**e, "text": "zebra " * 7}),
        ("c", lambda e: {k: v for k, v in e.items() if k != "text"}),
    ):
        other = tmp_path / f"{name}.json"
        other.write_text("".join(json.dumps(edit(json.loads(x))) + "\n" for x in open(pool)))
        main(["--model", teacher, "--manifest", str(other), "--out-dir", str(tmp_path / name), *SETTINGS])
        assert _manifest(tmp_path / name) == _manifest(tmp_path / "a")
    assert "against_manifest_text" not in json.loads((tmp_path / "c" / pl.SUMMARY).read_text())
    model = pl.load_teacher(teacher)
    paths = [u.audio for u in pl.read_inputs([pool])]
    hyps = model.transcribe(paths, batch_size=4, verbose=False)
    nemo = [h if isinstance(h, str) else h.text for h in hyps]
    rows = pl.collect(str(tmp_path / "a"), len(paths), 4, 1)
    assert [r["label"] for r in rows] == nemo


def test_resume_after_a_kill_and_shards_merge_to_the_same_output(
    teacher, tiny_llm, pool, llm_run, tmp_path, monkeypatch
):
    ref, _ = llm_run
    main = _script()
    args = ["--model", teacher, "--manifest", pool, "--llm", tiny_llm, *SETTINGS]
    # killed after 3 blocks, with a torn fourth line
    real, calls = pl.label_block, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pl, "label_block", dying)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out-dir", str(tmp_path / "killed")])
    labels = tmp_path / "killed" / pl.LABELS.format(i=0, n=1)
    with open(labels, "a") as f:
        f.write('{"block": 3, "rows": [{"key"')
    monkeypatch.setattr(pl, "label_block", real)
    main([*args, "--out-dir", str(tmp_path / "killed")])
    assert _manifest(tmp_path / "killed") == _manifest(ref)
    # two shards, then a merge; an unfinished shard is named
    main([*args, "--out-dir", str(tmp_path / "sharded"), "--shard", "1/2"])
    with pytest.raises(SystemExit):
        main(["--manifest", pool, "--out-dir", str(tmp_path / "sharded"), "--merge"])
    main([*args, "--out-dir", str(tmp_path / "sharded"), "--shard", "0/2"])
    main(["--manifest", pool, "--out-dir", str(tmp_path / "sharded"), "--merge"])
    assert _manifest(tmp_path / "sharded") == _manifest(ref)


def test_filter_keeps_what_it_says(llm_run, pool, tmp_path):
    ref, summary = llm_run
    rows = [{"label": t, "confidence": c} for t, c in [("a", 0.9), ("b", 0.2), ("", 0.99), ("c", 0.5), ("d", 0.5)]]
    assert pl.select(rows, None, None) == [True, True, False, True, True]
    assert pl.select(rows, 0.5, None) == [True, False, False, True, True]
    assert pl.select(rows, None, 0.4) == [True, False, False, True, False]  # 2 of 5, ties in input order
    assert pl.select(rows, 0.6, 0.8) == [True, False, False, False, False]
    for bad in ((1.5, None), (None, 0.0)):
        with pytest.raises(ValueError, match="--min-confidence|--keep-fraction"):
            pl.select(rows, *bad)
    folder = tmp_path / "f"
    shutil.copytree(ref, folder)
    s = pl.finalize([pool], str(folder), min_confidence=None, keep_fraction=0.5)
    kept = [json.loads(x) for x in _manifest(folder).splitlines()]
    assert s["kept"] == len(kept) == 16
    everything = pl.collect(str(folder), 32, 4, 1)
    threshold = sorted(round(pl.confidence(r), 6) for r in everything)[-16]
    assert min(x["pl_confidence"] for x in kept) >= threshold


def test_bad_input_is_named(teacher, pool, tmp_path, capsys):
    main = _script()
    lines = open(pool).read().splitlines()
    bad = tmp_path / "bad.json"
    e = json.loads(lines[1])
    e["audio_filepath"] = "/nonexistent/x.wav"
    bad.write_text("\n".join([lines[0], json.dumps(e), "{not json"]) + "\n")
    with pytest.raises(pl.ManifestError, match=r"bad\.json:3: malformed JSON"):
        pl.read_inputs([str(bad)])
    bad.write_text("\n".join([lines[0], json.dumps(e)]) + "\n")
    with pytest.raises(SystemExit):
        main(["--model", teacher, "--manifest", str(bad), "--out-dir", str(tmp_path / "o"), *SETTINGS])
    assert f"{bad}:2: audio file not found: /nonexistent/x.wav" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text("\n")
    with pytest.raises(pl.ManifestError, match="empty.json: the manifest has no lines"):
        pl.read_inputs([str(empty)])
    not_llm = tmp_path / "not_an_llm"
    not_llm.mkdir()
    with pytest.raises(SystemExit):
        main(
            [
                "--model",
                teacher,
                "--manifest",
                pool,
                "--out-dir",
                str(tmp_path / "o2"),
                "--llm",
                str(not_llm),
                *SETTINGS,
            ]
        )
    assert f"--llm {not_llm}: the LLM does not load" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", teacher, "--manifest", pool, "--out-dir", str(tmp_path / "o3"), "--shard", "2/2"])
    assert "--shard 2/2" in capsys.readouterr().err


def test_other_settings_in_the_same_folder_are_refused(teacher, pool, tmp_path, capsys):
    main = _script()
    out = str(tmp_path / "o")
    main(["--model", teacher, "--manifest", pool, "--out-dir", out, *SETTINGS])
    with pytest.raises(SystemExit):
        main(["--model", teacher, "--manifest", pool, "--out-dir", out, *SETTINGS, "--nbest", "3"])
    assert "nbest differ" in capsys.readouterr().err
    # the temperature acts when the manifest is written: no relabelling
    summary = main(["--manifest", pool, "--out-dir", out, "--merge", "--temperature", "0.5"])
    assert summary["temperature"] == 0.5


def test_checkpoint_average_is_the_mean_of_the_weights(teacher, tmp_path):
    model = pl.load_teacher(teacher)
    state = model.state_dict()
    shifted = {k: v + 2.0 if v.is_floating_point() else v for k, v in state.items()}
    for name, s in (("a", state), ("b", shifted)):
        torch.save({"state_dict": s}, tmp_path / f"{name}.ckpt")
    avg = pl.load_teacher(teacher, [str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt")]).state_dict()
    k = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    torch.testing.assert_close(avg[k], state[k] + 1.0)


def test_fitted_temperature_recovers_the_one_that_made_the_data():
    """Rows whose label is right with probability softmax(s / T0): the fitted T is T0 (within the grid's step), and
    it calibrates (expected calibration error below T = 1's)."""
    g = torch.Generator().manual_seed(0)
    rows, refs = [], []
    for _ in range(3000):
        a = float(torch.rand((), generator=g)) * 2
        right = bool(torch.rand((), generator=g) < torch.sigmoid(torch.tensor(a / 0.3)))
        rows.append({"label": "yes", "scores": [a, 0.0], "tokens": [1, 1], "chosen": 0})
        refs.append("yes" if right else "no")
    fit = pl.fit_temperature(rows, refs)
    assert 0.25 <= fit["temperature"] <= 0.36
    assert fit["ece"] < fit["ece_at_1"]
    with pytest.raises(ValueError, match="--temperature"):
        pl.confidence(rows[0], 0.0)
