"""prepare.py on data made here: a tiny synthetic build, a folder of real-format files with bad ones
mixed in, every caption format, resume after a kill, the untrained-codec fallback. No network: the
codec is the untrained fallback and the text encoder the MiniLM shipped in its wheel."""
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import run_train

import data
import prepare
from synth import synth_song

LAYOUT = ["meta.json", "skipped.jsonl"] + [
    f"{s}_{f}" for s in ("train", "val")
    for f in ("codes.bin", "clips.npy", "text.bin", "text_index.npy", "captions.jsonl")]
TINY = ["--synth_songs=5", "--synth_seconds=4", "--clip_seconds=2", "--min_seconds=1",
        "--codec=untrained", "--max_text_tokens=24", "--val_fraction=0.2"]


def build(tmp, *argv):
    args = prepare.parse_args([f"--data_dir={tmp}", *argv])
    return prepare.prepare(args), Path(tmp) / args.name


def killed_after(n, monkeypatch):
    """Make prepare.py die while encoding its (n + 1)-th source, as a kill would."""
    encode, done = prepare.encode_source, []

    def encode_or_die(*args):
        if len(done) == n:
            raise RuntimeError(f"simulated kill after {n} sources")
        done.append(args[0])
        return encode(*args)
    monkeypatch.setattr(prepare, "encode_source", encode_or_die)


def load_split(root, split):
    """The files of one split read by hand (not through data.read_split): meta, clips (n, 4), codes,
    each clip's first caption's states padded to max_tokens (n, max_tokens, dim) and their token
    counts, the captions rows."""
    meta = json.loads((root / "meta.json").read_text())
    K, dim, T = (meta["codec"]["n_codebooks"], meta["text_encoder"]["dim"],
                 meta["text_encoder"]["max_tokens"])
    clips = np.load(root / f"{split}_clips.npy")
    codes = np.memmap(root / f"{split}_codes.bin", dtype=np.uint16, mode="r").reshape(K, -1)
    states = np.memmap(root / f"{split}_text.bin", dtype=np.float16, mode="r").reshape(-1, dim)
    index = np.load(root / f"{split}_text_index.npy")
    text, text_len = np.zeros((len(clips), T, dim), np.float16), index[clips[:, 2], 1]
    for i, (o, n) in enumerate(index[clips[:, 2]]):
        text[i, :n] = states[o:o + n]
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
    # 5 songs x 2 clips
    assert meta["splits"]["train"]["clips"] + meta["splits"]["val"]["clips"] == 10
    for split in ("train", "val"):
        meta, clips, codes, text, text_len, captions = load_split(root, split)
        assert clips[:, 1].sum() == codes.shape[1] == meta["splits"][split]["frames"]
        assert (clips[:, 0] == np.concatenate([[0], np.cumsum(clips[:-1, 1])])).all()
        assert (clips[:, 1] == 150).all()  # 2 s at 75 Hz
        assert codes.max() < 1024
        assert (len(text_len) == len(captions) == len(clips) and (1 <= text_len).all()
                and (text_len <= 24).all())
        for row, n, t in zip(captions, text_len, text):
            assert np.abs(t[:n]).sum() > 0 and not t[n:].any()  # real tokens, then zero padding
            a, caption = row["attributes"], row["captions"][0]
            for value in (a["instrument"], f"{a['key']} {a['mode']}", f"{a['bpm']} BPM",
                          a["register"], a["density"]):
                assert value in caption, (value, caption)


def test_split_keeps_each_source_in_one_split(synth):
    _, root = synth
    sources = {s: {r["source"] for r in load_split(root, s)[5]} for s in ("train", "val")}
    assert sources["train"] and sources["val"] and not sources["train"] & sources["val"]


def test_synth_is_deterministic():
    a, b = synth_song(3, 2.0, seed=1), synth_song(3, 2.0, seed=1)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert not np.array_equal(a[0], synth_song(4, 2.0, seed=1)[0])


def test_untrained_codec_uses_many_codes_and_warns(synth, capfd):
    _, root = synth
    _, _, codes, *_ = load_split(root, "train")
    used = [len(np.unique(row)) for row in codes]  # distinct codes per codebook over 1200 frames
    # (the later residuals of so little data are small)
    assert used[0] > 200 and min(used) > 10, used
    data.load_codec("untrained")
    assert "UNTRAINED" in capfd.readouterr().err


def tone(seconds, sr=44100, channels=2, freq=330.0):
    t = np.arange(int(seconds * sr)) / sr
    return np.stack([0.3 * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)],
                    1).astype(np.float32)


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
                       "--min_seconds=0.5", "--codec=untrained", "--val_fraction=0.5",
                       "--max_text_tokens=16")
    skipped = {json.loads(l)["source"]: json.loads(l)["reason"]
               for l in (root / "skipped.jsonl").read_text().splitlines()}
    assert set(skipped) == {"corrupt.wav", "empty.wav", "notes.wav", "short.wav", "silent.wav",
                            "nocaption.wav"}
    assert "unreadable" in skipped["corrupt.wav"] and "unreadable" in skipped["notes.wav"]
    assert "short" in skipped["short.wav"] and "silent" in skipped["silent.wav"]
    assert skipped["nocaption.wav"] == "no caption"
    landed = {r["source"]: r for s in ("train", "val") for r in load_split(root, s)[5]}
    assert set(landed) == {"good1.wav", "sub/good2.flac"}
    assert landed["sub/good2.flac"]["captions"] == ["caption of sub/good2"]
    # good1: 3 s -> a 2 s clip + a 1 s tail; good2: 2.5 s -> 2 s + 0.5 s tail
    lengths = sorted(int(n) for s in ("train", "val") for n in load_split(root, s)[1][:, 1])
    assert lengths == [38, 75, 150, 150] and meta["skipped"] == 6


def test_nothing_usable_exits_with_one_line(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "bad.wav").write_text("nope")
    r = subprocess.run([sys.executable, "prepare.py", f"--audio_dir={audio}",
                        f"--data_dir={tmp_path}", "--codec=untrained"],
                       capture_output=True, text=True, cwd=Path(prepare.__file__).parent)
    assert r.returncode == 1 and "nothing usable" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("argv,message", [
    (["--no_such_flag=1"], "unknown config key 'no_such_flag'"),
    (["--codec=mp3"], "expected one of encodec, untrained"),
    (["--clip_seconds=long"], "should be float"),
    (["--audio_dir=/no/such/dir"], "is not a folder"),
    (["--audio_dir=.", "--captions=/no/such.csv"], "does not exist")])
def test_bad_arguments_one_line(argv, message):
    r = subprocess.run([sys.executable, "prepare.py", *argv], capture_output=True, text=True,
                       cwd=Path(prepare.__file__).parent)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr


def listed(tmp_path, argv, names):
    """prepare.list_sources over empty files with these names (only listed, never read) ->
    ({source: captions}, {id: skip reason})."""
    audio = tmp_path / "audio"
    for name in names:
        (audio / name).parent.mkdir(parents=True, exist_ok=True)
        (audio / name).touch()
    sources, skipped = prepare.list_sources(prepare.parse_args([f"--audio_dir={audio}", *argv]))
    return {source: captions for source, _, captions, _ in sources}, dict(skipped)


@pytest.mark.parametrize("fmt", ["musiccaps_csv", "song_describer_csv", "jamendo_json", "jsonl"])
def test_caption_formats(tmp_path, fmt):
    files = {"musiccaps_csv": ("caps.csv",
                               "ytid,caption\nabc123,calm piano\nxyz789,\"loud, fast drums\"\n"),
             "song_describer_csv": ("caps.csv", "caption_id,path,caption\n"
                                                "1,00/abc123.2min.mp3,calm piano\n"
                                                "2,01/xyz789.2min.mp3,\"loud, fast drums\"\n"),
             "jamendo_json": ("caps.json", json.dumps({
                 "t1": {"path": "abc123.mp3", "caption": "calm piano"},
                 "t2": {"path": "xyz789.mp3", "caption": "loud, fast drums"}})),
             "jsonl": ("caps.jsonl", '{"id": "abc123", "caption": "calm piano"}\n'
                                     '{"id": "xyz789", "caption": "loud, fast drums"}\n')}
    name, text = files[fmt]
    (tmp_path / name).write_text(text)
    a, b = (("00/abc123.2min.mp3", "01/xyz789.2min.mp3") if fmt == "song_describer_csv"
            else ("abc123.wav", "x/xyz789.flac"))
    captions, skipped = listed(tmp_path, [f"--captions={tmp_path / name}"], [a, b, "other.wav"])
    assert captions == {a: ["calm piano"], b: ["loud, fast drums"]}
    assert skipped == {"other.wav": "no caption"}


def test_caption_table_rows_are_grouped_and_bad_rows_skipped(tmp_path):
    (tmp_path / "caps.csv").write_text(
        "ytid,caption,start_s,end_s\n"
        "a,first of a,,\na,second of a,,\n"  # Song Describer: several per track
        "b,b from 2 s,2,5\nb,b from 6 s,6,9\nb,b again from 2 s,2,5\n"  # segments
        "c,starts after it ends,5,3\nd,no such file,0,10\ne,,0,10\n"
        "f,not a number,x,10\n")
    captions, skipped = listed(tmp_path, [f"--captions={tmp_path / 'caps.csv'}"],
                               ["a.wav", "b.wav", "c.wav"])
    assert captions == {"a.wav": ["first of a", "second of a"],
                        "b.wav@2-5": ["b from 2 s", "b again from 2 s"],
                        "b.wav@6-9": ["b from 6 s"]}
    assert "not before its end" in skipped["c"] and skipped["c.wav"] == "no caption"
    assert skipped["d"] == "no audio file for this caption row" and "has no caption" in skipped["e"]
    assert "not numbers" in skipped["f"]
    captions, _ = listed(tmp_path / "again",
                         [f"--captions={tmp_path / 'caps.csv'}", "--start_key=", "--end_key="],
                         ["b.wav"])
    # segments ignored: whole file
    assert captions == {"b.wav": ["b from 2 s", "b from 6 s", "b again from 2 s"]}


def test_sidecar_captions_as_audiocraft_writes_them(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "a.json").write_text(json.dumps({"description": "a calm piano piece",
                                              "genre": "classical"}))
    (audio / "b.json").write_text(json.dumps({"description": "", "genre": "rock",
                                              "moods": ["calm", "dreamy"], "bpm": 120.0,
                                              "key": "C major", "title": "not used"}))
    (audio / "c.json").write_text("{not json")
    (audio / "d.json").write_text(json.dumps({"description": ["one caption", "another caption"]}))
    (audio / "e.json").write_text(json.dumps({"title": "only a title"}))
    (audio / "f.txt").write_text("a caption from a text file\n")
    captions, skipped = listed(tmp_path, [],
                               ["a.wav", "b.wav", "c.wav", "d.wav", "e.wav", "f.wav", "g.wav"])
    assert captions == {"a.wav": ["a calm piano piece"],
                        "b.wav": ["genre: rock. moods: calm, dreamy. bpm: 120. key: C major"],
                        "d.wav": ["one caption", "another caption"],
                        "f.wav": ["a caption from a text file"]}
    assert (skipped["c.wav"].startswith("c.json is not JSON")
            and skipped["e.wav"] == skipped["g.wav"] == "no caption")


def test_segments_are_cut_and_bad_segments_skipped(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "long.wav", tone(12.0, sr=48000), 48000)
    sf.write(audio / "other.wav", tone(4.0, freq=220.0), 44100)
    sf.write(audio / "third.wav", tone(4.0, freq=440.0), 44100)
    (tmp_path / "caps.csv").write_text(
        "ytid,caption,start_s,end_s\nlong,the start,1,4\nlong,later,6,9\n"
        "other,past the end,5,8\nthird,all of it,,\n")
    meta, root = build(tmp_path / "data", f"--audio_dir={audio}",
                       f"--captions={tmp_path / 'caps.csv'}", "--name=mc", "--clip_seconds=10",
                       "--min_seconds=1", "--codec=untrained", "--max_text_tokens=16")
    skipped = {json.loads(l)["source"]: json.loads(l)["reason"]
               for l in (root / "skipped.jsonl").read_text().splitlines()}
    assert (list(skipped) == ["other.wav@5-8"]
            and "past the end of the 4.0 s file" in skipped["other.wav@5-8"])
    rows = {r["source"]: (r, n) for s in ("train", "val")
            for r, n in zip(load_split(root, s)[5], load_split(root, s)[1][:, 1])}
    assert sorted(rows) == ["long.wav@1-4", "long.wav@6-9", "third.wav"]
    assert ([(rows[s][0]["start_second"], rows[s][1]) for s in sorted(rows)]
            == [(1.0, 225), (6.0, 225), (0.0, 300)])
    split_of = {r["source"]: s for s in ("train", "val") for r in load_split(root, s)[5]}
    # a file's segments together
    assert split_of["long.wav@1-4"] == split_of["long.wav@6-9"] != split_of["third.wav"]


def test_read_clips_memory_is_bounded_by_the_block(tmp_path):
    """Peak memory of reading a 2-minute 48 kHz stereo file in 5 s blocks vs decoding it whole
    (tracemalloc counts numpy's buffers): the blocks' peak is a small fraction, and the clips equal
    cutting the whole decoded file."""
    import tracemalloc
    import soxr
    sr, seconds = 48000, 120.0
    path = tmp_path / "long.wav"
    rng = np.random.default_rng(0)
    sf.write(path, (0.1 * rng.standard_normal((int(seconds * sr), 2))).astype(np.float32), sr,
             subtype="PCM_16")
    tracemalloc.start()
    streamed = [(s, w.copy()) for s, w in prepare.read_clips(path, 10.0, 1.0, block_seconds=5.0)]
    block_peak = tracemalloc.get_traced_memory()[1] - sum(w.nbytes for _, w in streamed)
    tracemalloc.reset_peak()
    whole = sf.read(str(path), dtype="float32", always_2d=True)[0].mean(axis=1)
    whole = soxr.resample(whole, sr, data.SAMPLE_RATE)
    whole_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"peak memory reading {seconds:.0f} s: {block_peak / 2**20:.1f} MiB in 5 s blocks, "
          f"{whole_peak / 2**20:.1f} MiB decoded whole")
    assert whole_peak > 40 * 2**20 and block_peak < whole_peak / 8, (block_peak, whole_peak)
    assert [s for s, _ in streamed] == [10.0 * i for i in range(12)]
    for (_, w), (_, c) in zip(streamed, prepare.cut_clips(whole, 10.0, 1.0)):
        # soxr's stream and whole resampling agree
        assert len(w) == len(c) and np.abs(w - c).max() < 1e-3


def test_interrupted_run_resumes_to_the_same_data(tmp_path, monkeypatch):
    argv = ["--name=synth", *TINY]
    _, whole = build(tmp_path / "a", *argv)
    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="simulated"):
        killed_after(2, m)
        build(tmp_path / "b", *argv)
    root = tmp_path / "b" / "synth"
    assert not (root / "meta.json").exists()  # no final files from the killed run
    work = next(root.glob(".work-*"))
    done = {p: p.stat().st_mtime_ns for p in work.glob("*.pt") if p.name != "codec.pt"}
    assert len(done) == 2
    _, resumed = build(tmp_path / "b", *argv)
    # finished sources were not encoded again
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    for f in LAYOUT + ["codec.pt"]:
        assert (whole / f).read_bytes() == (resumed / f).read_bytes(), f


def write_inputs(folder, kind):
    """A tiny dataset as each community keeps one, with bad rows mixed in -> (prepare.py arguments,
    the sources that must land, {source: the reason it must be skipped for})."""
    audio = folder / "audio"
    audio.mkdir(parents=True)
    for i, name in enumerate(["t1", "t2", "t3", "t4"]):
        sf.write(audio / f"{name}.wav", tone(5.0, freq=200.0 + 60 * i), 44100)
    if kind == "audiocraft":  # manifest + a .json beside each file, one without a description
        (audio / "t1.json").write_text(json.dumps({"description": "a bright organ tune",
                                                   "genre": "pop"}))
        (audio / "t2.json").write_text(json.dumps({"genre": "jazz", "moods": ["warm"], "bpm": 96}))
        (audio / "t3.json").write_text("this is not json")
        (audio / "t4.json").write_text(json.dumps({"description": "slow strings"}))
        rows = [{"path": str(audio / f"{n}.wav"), "duration": 5.0, "sample_rate": 44100}
                for n in ("t1", "t2", "t3", "t4")]
        rows.append({"path": str(audio / "gone.wav"), "duration": 5.0, "sample_rate": 44100})
        with gzip.open(folder / "data.jsonl.gz", "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n")
        return ([f"--manifest={folder / 'data.jsonl.gz'}"],
                {str(audio / f"{n}.wav") for n in ("t1", "t2", "t4")},
                {str(audio / "t3.wav"): "t3.json is not JSON",
                 str(audio / "gone.wav"): "no such file", "data.jsonl.gz:6": "not JSON"})
    if kind == "song_describer":  # several captions per track
        (folder / "caps.csv").write_text(
            "caption_id,path,caption\n1,t1.wav,first of t1\n2,t1.wav,second of t1\n"
            "3,t1.wav,third of t1\n4,t2.wav,only t2\n5,t3.wav,t3 one\n6,t3.wav,t3 two\n"
            "7,t4.wav,t4\n8,t9.wav,no such track\n")
        return ([f"--audio_dir={audio}", f"--captions={folder / 'caps.csv'}"],
                {"t1.wav", "t2.wav", "t3.wav", "t4.wav"},
                {"t9.wav": "no audio file"})
    (folder / "caps.csv").write_text(
        "ytid,start_s,end_s,caption\nt1,1,4,t1 middle\nt2,0,3,t2 start\nt3,2,5,t3 end\n"
        "t4,0,3,t4 start\nt4,8,11,past the end\nt5,4,2,backwards\n")  # MusicCaps: segments
    return ([f"--audio_dir={audio}", f"--captions={folder / 'caps.csv'}"],
            {"t1.wav@1-4", "t2.wav@0-3", "t3.wav@2-5", "t4.wav@0-3"},
            {"t4.wav@8-11": "past the end", "t5": "not before its end"})


REAL = ["--clip_seconds=2", "--min_seconds=1", "--codec=untrained", "--max_text_tokens=16",
        "--val_fraction=0.25"]


@pytest.mark.parametrize("kind", ["audiocraft", "song_describer", "musiccaps"])
def test_community_layouts_prepare_and_train(tmp_path, kind):
    argv, landed, skipped = write_inputs(tmp_path, kind)
    meta, root = build(tmp_path / "data", "--name=tiny", *argv, *REAL)
    reasons = {json.loads(l)["source"]: json.loads(l)["reason"]
               for l in (root / "skipped.jsonl").read_text().splitlines()}
    assert set(reasons) == set(skipped) and all(skipped[s] in reasons[s] for s in skipped), reasons
    rows = [r for s in ("train", "val") for r in load_split(root, s)[5]]
    assert {r["source"] for r in rows} == landed  # every good source landed, whole
    if kind == "audiocraft":
        by_source = {Path(r["source"]).name: r["captions"] for r in rows}
        assert (by_source["t1.wav"] == ["a bright organ tune"]
                and by_source["t2.wav"] == ["genre: jazz. moods: warm. bpm: 96"])
    if kind == "song_describer":
        assert ([r["captions"] for r in rows if r["source"] == "t1.wav"][0]
                == ["first of t1", "second of t1", "third of t1"])
        assert meta["splits"]["train"]["captions"] + meta["splits"]["val"]["captions"] == 7
    r = run_train(tmp_path / "data", tmp_path / "out", "configs/prefix_simba.py", "configs/tiny.py",
                  "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--seq_len=48",
                  "--batch_size=2", "--log_interval=1000")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "ckpt.pt").exists()


def test_train_batches_draw_each_caption_and_evaluation_takes_the_first(tmp_path):
    argv, _, _ = write_inputs(tmp_path, "song_describer")
    meta, root = build(tmp_path / "data", "--name=sd", *argv, *REAL, "--val_fraction=0.5")
    d = next(d for d in (data.read_split(root, s, meta) for s in ("train", "val"))
             if (d["clips"][:, 3] == 3).any())
    row = int(np.flatnonzero(d["clips"][:, 3] == 3)[0])  # a clip of t1, which has three captions
    first = d["clips"][row, 2]
    states = [torch.from_numpy(d["text"][o:o + n].astype(np.float32))
              for o, n in d["text_index"][first:first + 3]]
    gen = torch.Generator().manual_seed(0)
    drawn = [text_rows_caption(data.text_rows(d, [row], gen)[0][0], states) for _ in range(60)]
    # each about a third
    assert sorted(set(drawn)) == [0, 1, 2] and min(drawn.count(i) for i in range(3)) > 10
    assert all(text_rows_caption(data.text_rows(d, [row])[0][0], states) == 0 for _ in range(3))


def text_rows_caption(text, states):
    """Which of a clip's captions (their token states) a padded text row holds."""
    return next(i for i, s in enumerate(states)
                if torch.equal(text[:len(s)], s) and not text[len(s):].any())


def test_resumed_real_format_run_gives_identical_files(tmp_path, monkeypatch):
    argv, _, _ = write_inputs(tmp_path, "audiocraft")
    _, whole = build(tmp_path / "a", "--name=x", *argv, *REAL)
    with monkeypatch.context() as m, pytest.raises(RuntimeError, match="simulated"):
        killed_after(2, m)
        build(tmp_path / "b", "--name=x", *argv, *REAL)
    _, resumed = build(tmp_path / "b", "--name=x", *argv, *REAL)
    for f in LAYOUT + ["codec.pt"]:
        assert (whole / f).read_bytes() == (resumed / f).read_bytes(), f


def test_data_from_an_older_prepare_stops_train_with_one_line(synth, tmp_path):
    _, root = synth
    old = tmp_path / "tiny"  # (run_train trains on the dataset named tiny)
    shutil.copytree(root, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["layout"]
    (old / "meta.json").write_text(json.dumps(meta))
    r = run_train(tmp_path, tmp_path / "out", "configs/prefix_simba.py", "configs/tiny.py")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "older prepare.py" in r.stderr and "run prepare.py again" in r.stderr


def test_fixed_captions_are_taken_without_encoding_again(tmp_path):
    argv, _, _ = write_inputs(tmp_path, "song_describer")
    _, root = build(tmp_path / "data", "--name=sd", *argv, *REAL)
    work = {p: p.stat().st_mtime_ns for p in next(root.glob(".work-*")).glob("*.pt")}
    caps = tmp_path / "caps.csv"
    caps.write_text(caps.read_text().replace("only t2", "t2 corrected"))
    build(tmp_path / "data", "--name=sd", *argv, *REAL)
    assert {p: p.stat().st_mtime_ns for p in work} == work  # no audio encoded again
    rows = [r for s in ("train", "val") for r in load_split(root, s)[5]]
    assert [r["captions"] for r in rows if r["source"] == "t2.wav"][0] == ["t2 corrected"]


def test_text_is_padded_to_the_longest_caption_of_the_batch():
    states = [np.full((3, 4), 1, np.float16), np.full((5, 4), 2, np.float16)]
    text, mask = data.pad_text(states)
    assert text.shape == (2, 5, 4) and mask.sum(1).tolist() == [3, 5]
    assert (text[0, :3] == 1).all() and (text[0, 3:] == 0).all() and (text[1] == 2).all()


def test_encoder_run_window_by_window_gives_the_one_pass_numbers(monkeypatch):
    torch.manual_seed(0)
    codec, _ = data.load_codec("untrained")
    # two clips of 7.3 s: not a whole number of windows (1 s) nor of frames (320 samples)
    x = 0.1 * torch.randn(2, 1, round(7.3 * data.SAMPLE_RATE))
    with torch.no_grad():
        whole = codec.encoder(x)  # (2, 128, frames)
        windows = prepare.encoder_latent(codec, x, window_seconds=1.0)
        # the same up to float rounding (the matrix products are blocked by another length)
        assert windows.shape == whole.shape
        assert (windows - whole).abs().max() < 1e-5 * whole.abs().max()
        codes = prepare.encode_clips(codec, list(x[:, 0].numpy()), batch_size=2)
        same = torch.stack(codes).long() == codec.encode(x)[0][0]
        assert same.float().mean() > 0.999
        monkeypatch.setattr(prepare, "ENCODER_CONTEXT", 320)  # less than the 798 samples it sees
        short = prepare.encoder_latent(codec, x, window_seconds=1.0)
        assert (short - whole).abs().max() > 1e-3 * whole.abs().max()
