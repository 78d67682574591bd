"""Real music to measure the folder path with: Debian's free game soundtracks, made into a corpus.

    python real_music.py OUT_DIR [--install] [--sample-rate 16000]

Sources (installed from Debian's archive, never committed): `openttd-openmsx` (MIDI compositions,
GPL-2.0) rendered with `fluidsynth` and the `fluid-soundfont-gm` instruments, and `drascula-music`
(OGG recordings) decoded with `sox`. `--install` runs apt-get for them (needs root).

Writes OUT_DIR/audio/*.wav and the files `data.source=folder` reads:
  train.tsv, test.tsv   `path<TAB>caption` per file (about 85 / 15 of the files, by name)
  heldout.txt           the test captions, one per line (held-out prompts)
  user.txt              freely worded prompts
Captions of MIDI pieces are written from the file: its tempo, General MIDI instrument families
and whether channel 10 (drums) plays; OGG recordings get a generic caption with their tempo class
unknown ("instrumental game soundtrack"). Then, e.g.:
  python pretrain.py config.yaml data.source=folder data.train_captions=OUT_DIR/train.tsv \
      data.test_captions=OUT_DIR/test.tsv data.heldout_prompts=OUT_DIR/heldout.txt \
      data.user_prompts=OUT_DIR/user.txt out_dir=runs/real

    python real_music.py OUT_DIR --benchmark [section.key=value ...]

runs benchmark.py's experiment on that corpus (out_dir runs/real): one DRAGON run per reward type
that needs no ratings (REAL_RUNS; the exemplars are the held-out files or their captions), each
evaluated against the base model on the held-out captions (cycled, new seeds), with the level,
clipping and dropouts the listener hears in both models' clips.
"""
import argparse
import glob
import os
import shutil
import struct
import subprocess
import sys

MIDI_DIR = "/usr/share/games/openttd/baseset/openmsx"
OGG_DIR = "/usr/share/scummvm/drascula/audio"
SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
PACKAGES = ["openttd-openmsx", "fluidsynth", "fluid-soundfont-gm", "drascula-music", "sox",
            "libsox-fmt-all"]
GM_FAMILIES = ["piano", "chromatic percussion", "organ", "guitar", "bass", "strings",
               "string ensemble", "brass", "reeds", "pipes", "synth lead", "synth pad",
               "synth effects", "ethnic instruments", "percussion", "sound effects"]


GREEDY = {"dragon.sets": "greedy"}
# rewards score loudness-normalised clips: on real music DRAGON otherwise wins partly by level
REAL_REWARD = ["reward.level_rms=0.1"]
REAL_RUNS = {   # run name: (target reward spec, {out}: the corpus folder; train.py overrides)
    "clap_score": ("clap_score", {"dragon.demo_steps": 40}),
    "fad_song_latent": ("fad_per_song/latent/audio:{out}/test.tsv", {}),
    "fad_song_clap": ("fad_per_song/clap/audio:{out}/test.tsv", {}),
    "fad_song_text": ("fad_per_song/clap/text:{out}/heldout.txt", {}),
    "fad_dataset_clap": ("fad_dataset/clap/audio:{out}/test.tsv", GREEDY),
    "vendi_clap": ("vendi/clap", {**GREEDY, "dragon.demo_steps": 40}),
}


def folder_overrides(out):
    """The data.* overrides that point config.yaml at the corpus in `out`."""
    return ["data.source=folder", f"data.train_captions={out}/train.tsv",
            f"data.test_captions={out}/test.tsv", f"data.heldout_prompts={out}/heldout.txt",
            f"data.user_prompts={out}/user.txt"]


def real_benchmark(out, overrides):
    from benchmark import benchmark
    from launch import load_config
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.yaml"), [
        *folder_overrides(out), *REAL_REWARD, "out_dir=runs/real",
        f"reward.reference=audio:{out}/test.tsv",
        "eval.rewards=[clap_score, vendi/clap]", "benchmark.listen_runs=[]", *overrides])
    return benchmark(cfg, {name: (spec.format(out=os.path.abspath(out)), o)
                           for name, (spec, o) in REAL_RUNS.items()
                           if not cfg["benchmark"]["runs"] or name in cfg["benchmark"]["runs"]})


def read_varlen(data, i):
    value = 0
    while True:
        byte = data[i]
        i += 1
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, i


def midi_facts(path):
    """(first tempo in BPM, sorted GM instrument families, drums played) of a standard MIDI file."""
    data = open(path, "rb").read()
    if data[:4] != b"MThd":
        raise ValueError(f"{path}: not a standard MIDI file")
    i, bpm, families, drums = 8 + struct.unpack(">I", data[4:8])[0], None, set(), False
    while i + 8 <= len(data):
        kind, length = data[i:i + 4], struct.unpack(">I", data[i + 4:i + 8])[0]
        j, end, status = i + 8, i + 8 + length, 0
        while kind == b"MTrk" and j < end:
            _, j = read_varlen(data, j)                      # delta time
            if data[j] & 0x80:
                status, j = data[j], j + 1
            if status == 0xFF:                               # meta event
                meta, (n, j) = data[j], read_varlen(data, j + 1)
                if meta == 0x51 and bpm is None:
                    bpm = 60e6 / int.from_bytes(data[j:j + 3], "big")
                j += n
            elif status in (0xF0, 0xF7):                     # sysex
                n, j = read_varlen(data, j)
                j += n
            else:
                channel, high = status & 0x0F, status & 0xF0
                if high == 0xC0 and channel != 9:
                    families.add(GM_FAMILIES[data[j] // 8])
                if high == 0x90 and channel == 9 and data[j + 1] > 0:
                    drums = True
                j += 1 if high in (0xC0, 0xD0) else 2
        i = end
    return bpm or 120.0, sorted(families) or ["piano"], drums


def midi_caption(path):
    bpm, families, drums = midi_facts(path)
    tempo = "slow" if bpm < 90 else "medium tempo" if bpm < 130 else "fast"
    names = families[0] if len(families) == 1 else ", ".join(families[:-1]) + " and " + families[-1]
    return (f"{tempo} piece at {round(bpm)} bpm for {names}, "
            + ("with drums" if drums else "without drums"))


def run(cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--install", action="store_true",
                    help="apt-get install the Debian packages (root)")
    ap.add_argument("--sample-rate", type=int, default=44100, help="rate the files are written at")
    ap.add_argument("--benchmark", nargs="*", metavar="KEY=VALUE",
                    help="run the benchmark on an existing corpus in out_dir, with config "
                         "overrides")
    args = ap.parse_args(argv)
    if args.benchmark is not None:
        return real_benchmark(args.out_dir, args.benchmark)
    if args.install:
        run(["apt-get", "install", "-y", "-qq", *PACKAGES])
    missing = [p for p in (MIDI_DIR, OGG_DIR, SOUNDFONT) if not os.path.exists(p)] + \
              [t for t in ("fluidsynth", "sox") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing {missing}: run with --install, or apt-get install "
                         f"{' '.join(PACKAGES)}")
    audio_dir = os.path.join(args.out_dir, "audio")
    os.makedirs(audio_dir, exist_ok=True)
    rows = []
    for mid in sorted(glob.glob(os.path.join(MIDI_DIR, "*.mid"))):
        name = os.path.splitext(os.path.basename(mid))[0] + ".wav"
        run(["fluidsynth", "-ni", "-q", "-g", "0.6", "-r", str(args.sample_rate), "-F",
             os.path.join(audio_dir, name), SOUNDFONT, mid])
        rows.append((f"audio/{name}", midi_caption(mid)))
    for ogg in sorted(glob.glob(os.path.join(OGG_DIR, "*.ogg"))):
        name = "drascula_" + os.path.splitext(os.path.basename(ogg))[0] + ".wav"
        run(["sox", ogg, "-b", "16", "-r", str(args.sample_rate), os.path.join(audio_dir, name)])
        rows.append((f"audio/{name}", "instrumental game soundtrack, orchestral and atmospheric"))
    test = rows[::7]                                         # every 7th file: about 15%
    train = [r for r in rows if r not in test]
    for fname, part in (("train.tsv", train), ("test.tsv", test)):
        with open(os.path.join(args.out_dir, fname), "w") as f:
            f.writelines(f"{p}\t{c}\n" for p, c in part)
    with open(os.path.join(args.out_dir, "heldout.txt"), "w") as f:
        f.writelines(f"{c}\n" for _, c in test)
    with open(os.path.join(args.out_dir, "user.txt"), "w") as f:
        f.writelines(f"{p}\n" for p in ["some calm piano music", "a fast tune with drums",
                                        "an orchestral theme",
                                        "a bluesy piece with bass and guitar",
                                        "slow strings, no drums"])
    print(f"wrote {len(rows)} files ({len(train)} train, {len(test)} test) and captions to "
          f"{args.out_dir}")
    print("use it with: python pretrain.py config.yaml " + " ".join(folder_overrides(args.out_dir))
          + " out_dir=runs/real  (the same overrides for train.py and eval.py, with "
          + " ".join(REAL_REWARD) + ")")


if __name__ == "__main__":
    main(sys.argv[1:])
