"""prepare.py on data made here: a tiny synthetic build, a folder of real-format files with bad ones mixed in,
every caption format, resume after a kill, the untrained-codec fallback. No network: the codec is the untrained
fallback and the text encoder the MiniLM shipped in its wheel."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import prepare

LAYOUT = ["meta.json", "skipped.jsonl"] + [f"{s}_{f}" for s in ("train", "val") for f in
                                            ("codes.bin", "clips.npy", "text.bin", "text_len.npy", "captions.jsonl")]
TINY = ["--synth_songs=5", "--synth_seconds=4", "--clip_seconds=2", "--min_seconds=1", "--codec=untrained",
        "--max_text_tokens=24", "--val_fraction=0.2"]


def build(tmp, *argv, fail_after=None):
    args = prepare.parse_args([f"--data_dir={tmp}", *argv])
    return prepare.prepare(args, fail_after=fail_after), Path(tmp) / args.name


def load_split(root, split):
    meta = json.loads((root / "meta.json").read_text())
    K, dim, T = meta["codec"]["n_codebooks"], meta["text_encoder"]["dim"], meta["text_encoder"]["max_tokens"]
    clips = np.load(root / f"{split}_clips.npy")
    codes = np.memmap(root / f"{split}_codes.bin", dtype=np.uint16, mode="r").reshape(K, -1)
    text = np.memmap(root / f"{split}_text.bin", dtype=np.float16, mode="r").reshape(len(clips), T, dim)
    text_len = np.load(root / f"{split}_text_len.npy")
    captions = [json.loads(l) for l in (root / f"{split}_captions.jsonl").read_text().splitlines()]
    return meta, clips, codes, text, text_len, captions


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synth")
    meta, root = build(tmp, "--name=synth", *TINY)
    return meta, root


def test_synth_layout_shapes_and_captions(synth):
    meta, root = synth
    assert all((root / f).exists() for f in LAYOUT)
    assert meta["codec"]["n_codebooks"] == 8 and meta["codec"]["pretrained"] is False
    assert meta["splits"]["train"]["clips"] + meta["splits"]["val"]["clips"] == 10  # 5 songs x 2 clips
    for split in ("train", "val"):
        meta, clips, codes, text, text_len, captions = load_split(root, split)
        assert clips[:, 1].sum() == codes.shape[1] == meta["splits"][split]["frames"]
        assert (clips[:, 0] == np.concatenate([[0], np.cumsum(clips[:-1, 1])])).all()
        assert (clips[:, 1] == 150).all()  # 2 s at 75 Hz
        assert codes.max() < 1024
        assert len(text_len) == len(captions) == len(clips) and (1 <= text_len).all() and (text_len <= 24).all()
        for row, n, t in zip(captions, text_len, text):
            assert np.abs(t[:n]).sum() > 0 and not t[n:].any()  # real tokens, then zero padding
            a, caption = row["attributes"], row["caption"]
            for value in (a["instrument"], f"{a['key']} {a['mode']}", f"{a['bpm']} BPM", a["register"], a["density"]):
                assert value in caption, (value, caption)


def test_split_keeps_each_source_in_one_split(synth):
    _, root = synth
    sources = {s: {r["source"] for r in load_split(root, s)[5]} for s in ("train", "val")}
    assert sources["train"] and sources["val"] and not sources["train"] & sources["val"]


def test_synth_is_deterministic():
    a, b = prepare.synth_song(3, 2.0, seed=1), prepare.synth_song(3, 2.0, seed=1)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], prepare.synth_song(4, 2.0, seed=1)[0])


def test_untrained_codec_uses_many_codes_and_warns(synth, capfd):
    _, root = synth
    _, _, codes, *_ = load_split(root, "train")
    used = [len(np.unique(row)) for row in codes]  # distinct codes per codebook over 1200 frames
    assert used[0] > 200 and min(used) > 10, used  # (the later residuals of so little data are small)
    prepare.load_codec("untrained")
    assert "UNTRAINED" in capfd.readouterr().err


def tone(seconds, sr=44100, channels=2, freq=330.0):
    t = np.arange(int(seconds * sr)) / sr
    return np.stack([0.3 * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)], 1).astype(np.float32)


def test_bad_files_are_skipped_with_reasons(tmp_path):
    audio = tmp_path / "audio"
    (audio / "sub").mkdir(parents=True)
    sf.write(audio / "good1.wav", tone(3.0), 44100)  # stereo, 44.1 kHz: mixdown + resampling
    sf.write(audio / "sub" / "good2.flac", tone(2.5, sr=16000, channels=1), 16000)
    (audio / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40))
    (audio / "empty.wav").write_bytes(b"")
    (audio / "notes.wav").write_text("this is a text file")
    sf.write(audio / "short.wav", tone(0.1), 44100)
    sf.write(audio / "silent.wav", np.zeros((48000, 1), np.float32), 24000)
    sf.write(audio / "nocaption.wav", tone(3.0), 44100)
    for name in ("good1", "sub/good2", "corrupt", "empty", "notes", "short", "silent"):
        (audio / f"{name}.txt").write_text(f"caption of {name}")
    meta, root = build(tmp_path / "data", f"--audio_dir={audio}", "--name=real", "--clip_seconds=2",
                       "--min_seconds=0.5", "--codec=untrained", "--val_fraction=0.5", "--max_text_tokens=16")
    skipped = {json.loads(l)["source"]: json.loads(l)["reason"] for l in (root / "skipped.jsonl").read_text().splitlines()}
    assert set(skipped) == {"corrupt.wav", "empty.wav", "notes.wav", "short.wav", "silent.wav", "nocaption.wav"}
    assert "unreadable" in skipped["corrupt.wav"] and "unreadable" in skipped["notes.wav"]
    assert "short" in skipped["short.wav"] and "silent" in skipped["silent.wav"]
    assert skipped["nocaption.wav"] == "no caption"
    landed = {r["source"]: r for s in ("train", "val") for r in load_split(root, s)[5]}
    assert set(landed) == {"good1.wav", "sub/good2.flac"}
    assert landed["sub/good2.flac"]["caption"] == "caption of sub/good2"
    # good1: 3 s -> a 2 s clip + a 1 s tail; good2: 2.5 s -> 2 s + 0.5 s tail
    lengths = sorted(int(n) for s in ("train", "val") for n in load_split(root, s)[1][:, 1])
    assert lengths == [38, 75, 150, 150] and meta["skipped"] == 6


def test_nothing_usable_exits_with_one_line(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "bad.wav").write_text("nope")
    r = subprocess.run([sys.executable, "prepare.py", f"--audio_dir={audio}", f"--data_dir={tmp_path}",
                        "--codec=untrained"], capture_output=True, text=True, cwd=Path(prepare.__file__).parent)
    assert r.returncode == 1 and "nothing usable" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("argv,message", [(["--no_such_flag=1"], "unrecognized arguments"),
                                          (["--audio_dir=/no/such/dir"], "is not a folder"),
                                          (["--audio_dir=.", "--captions=/no/such.csv"], "does not exist")])
def test_bad_arguments_one_line(argv, message):
    r = subprocess.run([sys.executable, "prepare.py", *argv], capture_output=True, text=True,
                       cwd=Path(prepare.__file__).parent)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr


@pytest.mark.parametrize("fmt", ["musiccaps_csv", "song_describer_csv", "jamendo_json", "jsonl"])
def test_caption_formats(tmp_path, fmt):
    files = {"musiccaps_csv": ("caps.csv", "ytid,start_s,caption\nabc123,30,calm piano\nxyz789,0,\"loud, fast drums\"\n"),
             "song_describer_csv": ("caps.csv", "caption_id,path,caption\n1,00/abc123.2min.mp3,calm piano\n"
                                                "2,01/xyz789.2min.mp3,\"loud, fast drums\"\n"),
             "jamendo_json": ("caps.json", json.dumps({"t1": {"path": "abc123.mp3", "caption": "calm piano"},
                                                       "t2": {"path": "xyz789.mp3", "caption": "loud, fast drums"}})),
             "jsonl": ("caps.jsonl", '{"id": "abc123", "caption": "calm piano"}\n'
                                     '{"id": "xyz789", "caption": "loud, fast drums"}\n')}
    name, text = files[fmt]
    (tmp_path / name).write_text(text)
    caps = prepare.read_captions(tmp_path / name)
    audio = tmp_path / "audio"
    a, b = (("00/abc123.2min.mp3", "01/xyz789.2min.mp3") if fmt == "song_describer_csv" else ("abc123.wav", "x/xyz789.flac"))
    assert prepare.caption_for(audio / a, audio, caps) == "calm piano"
    assert prepare.caption_for(audio / b, audio, caps) == "loud, fast drums"
    with pytest.raises(prepare.Skip):
        prepare.caption_for(audio / "other.wav", audio, caps)


def test_interrupted_run_resumes_to_the_same_data(tmp_path):
    argv = ["--name=synth", *TINY]
    _, whole = build(tmp_path / "a", *argv)
    with pytest.raises(RuntimeError, match="simulated"):
        build(tmp_path / "b", *argv, fail_after=2)
    root = tmp_path / "b" / "synth"
    assert not (root / "meta.json").exists()  # no final files from the killed run
    work = next(root.glob(".work-*"))
    done = {p: p.stat().st_mtime_ns for p in work.glob("*.pt") if p.name != "codec.pt"}
    assert len(done) == 2
    _, resumed = build(tmp_path / "b", *argv)
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # finished sources were not encoded again
    for f in LAYOUT + ["codec.pt"]:
        assert (whole / f).read_bytes() == (resumed / f).read_bytes(), f
