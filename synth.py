"""The built-in synthetic music set: procedural songs (melody, bass, drums) at 24 kHz, each with a
caption written from its attributes (instrument, key, mode, BPM, drums, dynamics, register, note
density), which evaluate.py's text-adherence probe predicts back. `python prepare.py` with no audio
folder prepares it; song i is always the same.
"""
import random

import numpy as np

from data import SAMPLE_RATE

INSTRUMENTS = {  # harmonic amplitudes, attack s, decay per second (0: sustained)
    "piano": ([1, 0.5, 0.3, 0.2, 0.1, 0.05], 0.005, 3.0),
    "organ": ([1, 0.8, 0.6, 0.5, 0.3, 0.3, 0.2], 0.02, 0.0),
    "flute": ([1, 0.15, 0.05], 0.06, 0.3),
    "marimba": ([1, 0, 0.25, 0, 0.05], 0.002, 8.0),
    "synth lead": ([1, 0.5, 0.33, 0.25, 0.2, 0.17, 0.14, 0.12], 0.01, 0.5),
    "electric bass": ([1, 0.6, 0.2, 0.1], 0.005, 2.0),
    "string pad": ([1, 0.7, 0.5, 0.4, 0.3, 0.25], 0.25, 0.0),
}
KEYS = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
MODES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}
DRUMS = {  # 16 sixteenth-note steps per bar: k kick, s snare, h hi-hat
    "no drums": "................",
    "a rock beat": "k.h.s.h.k.h.s.h.",
    "a four-on-the-floor beat": "k.h.k.h.k.h.k.h.",
    "a breakbeat": "k.h.s.hkk.h.s.hs",
    "a half-time groove": "k.h.h.h.s.h.h.h.",
}
DYNAMICS = {"softly": 0.25, "at a moderate volume": 0.5, "loudly": 0.9}
REGISTERS = {"low": 3, "middle": 4, "high": 5}  # octave of the melody
DENSITIES = {"sparse": 4, "moderate": 2, "dense": 1}  # sixteenths per melody note
PHRASES = [
    ("A {density} {instrument} melody in {key} {mode} at {bpm} BPM with {drums}, played {dynamics} "
     "in the {register} register."),
    ("{Drums_cap} under a {dynamics_adj} {instrument} line in a {register} register; {key} {mode}, "
     "{bpm} BPM, {density} notes."),
    ("{bpm} BPM, {key} {mode}: {instrument} playing {density} phrases {dynamics} in the {register} "
     "register, with {drums}."),
    ("Instrumental in {key} {mode} featuring {instrument} ({register} register, {density} rhythm), "
     "{drums}, {bpm} BPM, played {dynamics}."),
]
DYNAMICS_ADJ = {"softly": "soft", "at a moderate volume": "moderate", "loudly": "loud"}


def synth_attributes(rng):
    return dict(instrument=rng.choice(sorted(INSTRUMENTS)), key=rng.choice(KEYS),
                mode=rng.choice(sorted(MODES)), bpm=rng.randrange(70, 161, 5),
                drums=rng.choice(sorted(DRUMS)), dynamics=rng.choice(sorted(DYNAMICS)),
                register=rng.choice(sorted(REGISTERS)), density=rng.choice(sorted(DENSITIES)))


def synth_caption(a, rng):
    return rng.choice(PHRASES).format(**a, Drums_cap=a["drums"][0].upper() + a["drums"][1:],
                                      dynamics_adj=DYNAMICS_ADJ[a["dynamics"]])


def _tone(freq, seconds, instrument, rng):
    harmonics, attack, decay = INSTRUMENTS[instrument]
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = sum(a * np.sin(2 * np.pi * freq * (h + 1) * t + rng.uniform(0, 6.28))
               for h, a in enumerate(harmonics) if a and freq * (h + 1) < SAMPLE_RATE / 2)
    env = np.minimum(t / attack, 1.0) * (np.exp(-decay * t) if decay else 1.0)
    env[-min(len(t), 240):] *= np.linspace(1, 0, min(len(t), 240))  # 10 ms release: no clicks
    return wave * env / sum(harmonics)


def _drum(kind, rng):
    t = np.arange(int(0.25 * SAMPLE_RATE)) / SAMPLE_RATE
    if kind == "k":
        return np.sin(2 * np.pi * (50 * t + 100 * (1 - np.exp(-30 * t)) / 30)) * np.exp(-18 * t)
    noise = rng.standard_normal(len(t))
    if kind == "s":
        return (0.6 * noise + 0.5 * np.sin(2 * np.pi * 185 * t)) * np.exp(-25 * t) * 0.7
    return np.diff(noise, prepend=0) * np.exp(-90 * t) * 0.25  # hi-hat: high-passed noise


def synth_song(index, seconds, seed=0):
    """Song `index` -> (waveform float32 at 24 kHz, caption, attributes); the same index always
    gives the same song."""
    rng = random.Random(seed * 1_000_003 + index)
    nrng = np.random.default_rng(seed * 1_000_003 + index)
    a = synth_attributes(rng)
    out = np.zeros(int(seconds * SAMPLE_RATE) + SAMPLE_RATE, dtype=np.float64)
    sixteenth = 60.0 / a["bpm"] / 4
    scale = MODES[a["mode"]]
    root = 12 * (REGISTERS[a["register"]] + 1) + KEYS.index(a["key"])  # MIDI note of the tonic
    # scale degrees per bar
    progression = rng.choice([[0, 4, 5, 3], [0, 3, 4, 0], [0, 5, 3, 4], [5, 3, 0, 4]])
    steps = int(seconds / sixteenth)
    degree = 0
    for step in range(0, steps, DENSITIES[a["density"]]):
        chord = progression[(step // 16) % 4]
        if rng.random() < 0.15:
            continue  # a rest
        degree = (chord + rng.choice([0, 2, 4]) if step % 16 == 0
                  else max(-3, min(10, degree + rng.choice([-2, -1, 1, 2]))))
        note = root + 12 * (degree // 7) + scale[degree % 7]
        start = int(step * sixteenth * SAMPLE_RATE)
        tone = _tone(440 * 2 ** ((note - 69) / 12), DENSITIES[a["density"]] * sixteenth * 1.5,
                     a["instrument"], nrng)
        out[start:start + len(tone)] += tone[:len(out) - start]
    # bass: the chord root on every bar, an octave below the tonic's octave
    for bar in range(0, steps, 16):
        bass = root - 24 + scale[progression[(bar // 16) % 4] % 7]
        tone = _tone(440 * 2 ** ((bass - 69) / 12), 16 * sixteenth, "electric bass", nrng) * 0.6
        start = int(bar * sixteenth * SAMPLE_RATE)
        out[start:start + len(tone)] += tone[:len(out) - start]
    pattern = DRUMS[a["drums"]]
    for step in range(steps):
        hit = pattern[step % 16]
        if hit != ".":
            start = int(step * sixteenth * SAMPLE_RATE)
            d = _drum(hit, nrng)
            out[start:start + len(d)] += d[:len(out) - start]
    out = out[:int(seconds * SAMPLE_RATE)]
    out = out / (np.abs(out).max() + 1e-9) * DYNAMICS[a["dynamics"]]
    return out.astype(np.float32), synth_caption(a, rng), a
