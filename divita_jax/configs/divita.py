r"""DIViTA on Trailers12k: the whole protocol, from trailers to results.

Default (synthetic Trailers12k, tiny random backbones, minutes on a CPU):
  python -m divita_jax.main --config=configs/divita.py --workdir=/tmp/divita

Real Trailers12k (videos in MANUAL_DIR/videos, MANUAL_DIR/mtgc.csv) with
converted ViT-B/16 and ViViT-B/16x2 checkpoints (README, "Getting the real
data": the presets read <checkpoints_dir>/vit_b16_in21k_in1k and
<checkpoints_dir>/vivit_b16x2_k400; checkpoints_dir defaults to
"checkpoints", relative to the current directory):
  python -m divita_jax.main --config=configs/divita.py:trailers12k \
    --config.dataset.manual_dir=MANUAL_DIR \
    --config.checkpoints_dir=/data/checkpoints --workdir=DIR

Table 6 from the official precomputed representations (MANUAL_DIR holds
mtgc.csv and the zarr groups, e.g. trailers_i_swin_fpc24.zarr):
  python -m divita_jax.main --config=configs/divita.py:reps \
    --config.dataset.manual_dir=MANUAL_DIR --workdir=DIR

Table 6 rows from raw trailers: a backbone pair after `trailers12k`, e.g.
`:trailers12k,swin` (the paper's best: Swin-T ImageNet + Video Swin-T
Kinetics-400), `:trailers12k,shufflenet`, `:trailers12k,resnet`, and
`:trailers12k` alone (ViT-B/16 + ViViT-B/16x2); single-branch rows add
`image_only` or `video_only`. Without `trailers12k` the same pair runs as
tiny random-init backbones on the synthetic data.

Variants (comma-separated after the colon): `trailers12k`, `reps`, `vit`,
`swin`, `shufflenet`, `resnet`, `image_only`, `video_only`, `early_fusion`,
`fixed_clips`, `runlocal` (even smaller), `finetune` (backbones and head
trained end to end on decoded clips: `:finetune` on the synthetic data,
`:trailers12k,swin,finetune` on a pod), `audio` (the soundtrack as a third
branch: a tiny random AST on the synthetic data; `:trailers12k,audio`
with AudioSet AST, see AUDIO_CHECKPOINTS), `audio_only`, and `whisper`
with either (the Whisper encoder over the soundtrack's chunks).
Any field can be overridden, e.g. `--config.model.cam=gru_1_115`; every
value is checked before any work (divita_jax/configs/checks.py).
"""

import ml_collections

from tfds_trailers12k import cut_rules, genres


def parse_variants(arg: str | None) -> set[str]:
  known = {
    "trailers12k",
    "image_only",
    "video_only",
    "early_fusion",
    "fixed_clips",
    "runlocal",
    "audio",
    "audio_only",
    "whisper",
    "reps",
    "vit",
    "swin",
    "shufflenet",
    "resnet",
    "finetune",
    "modern",
    *SINGLE,
  }
  variants = {v for v in (arg or "").split(",") if v}
  unknown = variants - known
  if unknown:
    raise ValueError(
      f"Unknown config variant(s) {sorted(unknown)}; known: {sorted(known)}."
    )
  if "whisper" in variants and not {"audio", "audio_only"} & variants:
    raise ValueError(
      "Config variant 'whisper' picks the audio branch's encoder: add "
      "'audio' or 'audio_only'."
    )
  return variants


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variants = parse_variants(arg)
  c = ml_collections.ConfigDict()
  c.seed = 0  # Seed of initialisation, data order and dropout.
  c.folds = (0, 1, 2)  # Official folds to train and evaluate.
  # Where the `trailers12k` presets find their converted checkpoints
  # (<checkpoints_dir>/<folder>, the folders of the TABLE6, SINGLE and
  # AUDIO_CHECKPOINTS tables below); a reference: overriding it moves
  # every preset's path.
  c.checkpoints_dir = ml_collections.FieldReference("checkpoints")

  # ---- Dataset (TFDS trailers12k) ----
  c.dataset = ml_collections.ConfigDict()
  c.dataset.config = "synthetic"  # synthetic | raw | reps.
  c.dataset.data_dir = ""  # TFDS data_dir; "" = <workdir>/tfds.
  c.dataset.manual_dir = ""  # raw / reps: mtgc.csv + videos/ or zarr groups.
  c.dataset.num_trailers = 96  # synthetic only: trailers to make (>= 10).
  # Shot detection at build time (tfds_trailers12k/shots.py), synthetic and raw.
  # content | adaptive (PySceneDetect's, exact) | transnetv2 (learned).
  c.dataset.detector = "content"
  c.dataset.threshold = 0.0  # 0 = the detector's default (27 / 3.0 / 0.5).
  # Frames; shorter shots merge into neighbours.
  c.dataset.min_shot_len = cut_rules.DEFAULT_MIN_SHOT_LEN
  c.dataset.downscale = 0  # Frame shrink factor; 0 = auto (~256 px wide).
  # transnetv2: the converted weights (python -m divita_jax.convert
  # --source transnetv2 --output DIR); part of the dataset's config name.
  c.dataset.checkpoint = ""
  # Flashes this short (frames) are not cuts.
  c.dataset.max_flash_len = cut_rules.DEFAULT_MAX_FLASH_LEN
  c.dataset.reencode_height = 0  # raw: re-encode to this height (0 = keep).
  c.dataset.reencode_fps = 0.0  # raw: re-encode to this fps (0 = keep).
  c.dataset.num_workers = 0  # Build processes; 0 = all cores.
  # Re-attempt trailers an interrupted build saved as skipped.
  c.dataset.retry_skipped = False
  # Apache Beam build (pip install -e '.[beam]'): a runner name
  # (FnApiRunner, DataflowRunner, FlinkRunner, ...) and/or pipeline options
  # ("--direct_num_workers=0,--direct_running_mode=multi_processing");
  # both "" = the local worker pool.
  c.dataset.beam_runner = ""
  c.dataset.beam_options = ""

  # ---- Clip sampling (divita_jax/video.py) ----
  c.clips = ml_collections.ConfigDict()
  c.clips.segmentation = "shots"  # shots (one clip per shot) | fixed.
  c.clips.frames_per_clip = 8  # T frames per clip (paper: 24).
  c.clips.fps = 8.0  # Frames sampled at this rate (paper: 24).
  c.clips.placement = "center"  # center | start | uniform, within a shot.
  c.clips.max_clips_per_shot = 1  # >1 splits long shots into several clips.

  # ---- Frozen backbones (divita_jax/models, divita_jax/extract.py) ----
  c.backbones = ml_collections.ConfigDict()
  for name, kind, variant in (
    ("image", "vit", "tiny/8"),
    ("video", "vivit", "tiny/8"),
  ):
    b = ml_collections.ConfigDict()
    # Random init only (a checkpoint's spec.json names its own): vit | swin |
    # resnet | shufflenet (per frame, pooled over T) | vivit | swin3d |
    # shufflenet3d | r2plus1d (per clip).
    b.kind = kind
    b.checkpoint = ""  # Converted checkpoint dir; "" = random init.
    b.variant = variant  # Used when checkpoint == "": model size/patch.
    b.resolution = 32  # Input side in pixels (short side resize + crop).
    # "" = the checkpoint's own convention; or imagenet|minus_one_one|zero_one.
    b.normalization = ""
    # Clips per extraction step per process, split over its local devices;
    # batches span trailers.
    b.batch_size = 16
    # 2-D kinds: mean over the clip's frames | center (frame T // 2 only:
    # decoded and run alone, T times cheaper; its own store tag).
    b.frame_pooling = "mean"
    # Compute dtype: float32 | bfloat16 | auto (bfloat16 on GPU/TPU, float32
    # on CPU).
    b.dtype = "float32"
    c.backbones[name] = b
  c.backbones.video.tubelet = 2  # Frames per tubelet (random init only).
  # The soundtrack (model.branches with "audio"): per clip, the log-mel of
  # clips.audio_seconds of audio centred on the clip (divita_jax/audio.py)
  # through an audio encoder; silence for a file without audio.
  a = ml_collections.ConfigDict()
  # Random init only (a checkpoint's spec names its own): ast | whisper.
  a.kind = "ast"
  # Converted dir (--source hf_ast | hf_whisper); "" = random init.
  a.checkpoint = ""
  a.variant = (
    "tiny"  # Random init: ast 'tiny' | 'B'; whisper 'tiny' | 'base' ...
  )
  a.mel_bins = 32  # Random init: the front end's mel bins ...
  a.mel_frames = 100  # ... and frames (10 ms each): its input, padded / cut.
  # window: each clip's audio window through the encoder alone (padded to
  # its input) | chunks (whisper): the soundtrack through the encoder in
  # consecutive inputs of mel_frames (30 s for a checkpoint), each clip the
  # mean of the encoder frames that fall in its window.
  a.pooling = "window"
  a.batch_size = 16  # Clips per extraction step per process.
  a.dtype = "float32"  # float32 | bfloat16 | auto.
  c.backbones.audio = a
  c.clips.audio_seconds = 1.0  # Audio window per clip; <= 0: the clip's span.

  # ---- Extraction (divita_jax/extract.py) ----
  c.extract = ml_collections.ConfigDict()
  # Decode worker processes per JAX process; -1 = auto: one per core less
  # one on GPU/TPU, 0 on CPU (its cores run the backbones). Each buffers
  # ~2 * decode_threads + 1 trailers in /dev/shm (~0.35 GB at 100 clips of
  # 24 x 224^2): give containers a large --shm-size.
  c.extract.decode_processes = -1
  c.extract.decode_threads = 2  # Threads per decoding process.

  # ---- Representations ----
  c.reps = ml_collections.ConfigDict()
  c.reps.dir = ""  # Store root; "" = <workdir>/reps.
  # reps config: official zarr groups (relative paths: under manual_dir).
  c.reps.zarr_image = ""  # Image branch, e.g. trailers_i_swin_fpc24.zarr.
  c.reps.zarr_video = ""  # Video branch.

  # ---- DIViTA head (divita_jax/models/divita.py) ----
  c.model = ml_collections.ConfigDict()
  c.model.branches = ("image", "video")  # Which representations to use.
  c.model.fusion = "late"  # late (mean of branch logits) | early (concat).
  c.model.cam = "tsfm_128_4_6_0.25"  # tsfm_* | savg | gru_* | conv_*.
  c.model.mask_padding = True  # False: reference's unmasked zero padding.
  c.model.num_classes = genres.NUM_GENRES

  # ---- Training (divita_jax/trainers/loop.py), reference values ----
  c.train = ml_collections.ConfigDict()
  # frozen: the head on extracted representations (the paper) | finetune:
  # backbones and head end to end on decoded clips (c.finetune).
  c.train.mode = "frozen"
  c.train.num_clips = 30  # Clips per training window / eval window.
  c.train.batch_size = 32  # Global batch of trailers.
  c.train.eval_batch_size = 64  # Global batch of eval windows.
  c.train.max_epochs = 100
  c.train.learning_rate = 1e-4
  c.train.weight_decay = 0.01  # AdamW decoupled weight decay.
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.amsgrad = True
  # Clip gradients to this global L2 norm before AdamW; 0 = off (the
  # reference does not clip).
  c.train.grad_clip_norm = 0.0
  c.train.plateau_patience = 10  # ReduceLROnPlateau on validation loss.
  c.train.plateau_factor = 0.1
  c.train.plateau_threshold = 1e-4  # Relative.
  c.train.early_stop_patience = 20  # On validation loss, min delta 0.
  # Validation loss: windows (official: mean over validation batches of the
  # windows' BCE) | trailers (BCE of trailer-averaged probabilities).
  c.train.val_loss = "windows"
  c.train.log_every_steps = 50
  c.train.checkpoint_every_epochs = 1

  # ---- End-to-end fine-tuning (trainers/finetune.py), train.mode ----
  c.finetune = ml_collections.ConfigDict()
  # Clips per training window (fits memory); evaluation: train.num_clips.
  c.finetune.clips_per_trailer = 8
  c.finetune.microbatches = 1  # Gradient accumulation within a step.
  # Evaluation windows hold train.num_clips clips (more than a training
  # window): run each eval batch through the backbones in this many parts.
  c.finetune.eval_microbatches = 1
  c.finetune.remat = "none"  # Per backbone block: none | full | dots.
  # Compute dtype, float32 master weights: float32 | bfloat16 | auto
  # (bfloat16 on GPU/TPU, float32 on CPU).
  c.finetune.dtype = "float32"
  c.finetune.freeze = ()  # Regexes searched in "<branch>/<param path>".
  # Freeze each backbone's layers below this (0 = stem, 1.. = blocks).
  c.finetune.freeze_layers = 0
  c.finetune.backbone_lr_scale = 0.1  # Backbone lr = head lr x this ...
  c.finetune.layer_decay = 1.0  # ... x decay ** (last layer + 1 - layer).
  # "regex=factor" pairs searched in "<branch>/<param path>" (the head is
  # "head/..."): learning-rate multipliers on top of the above, and
  # weight-decay multipliers (e.g. "bias|norm|scale=0" exempts them).
  c.finetune.lr_mults = ()
  c.finetune.wd_mults = ()
  # plateau (the frozen protocol's) | cosine (linear warmup, cosine to 0).
  c.finetune.schedule = "plateau"
  c.finetune.warmup_epochs = 1.0  # cosine only.
  # Head BatchNorm in training: batch (reference: batch statistics) |
  # running (the stored statistics, never updated: an affine layer, so
  # micro-batches equal one big batch exactly).
  c.finetune.head_batch_norm = "batch"
  # Training clips only; the same crop and flip for every frame of a clip.
  c.finetune.augment = ml_collections.ConfigDict()
  c.finetune.augment.flip = True
  c.finetune.augment.crop_scale = (0.35, 1.0)  # Area fraction of the frame.
  c.finetune.augment.crop_ratio = (0.75, 1.3333)  # Aspect ratio range.
  c.finetune.decode_threads = 2  # Decoding threads per batch.
  # Worker processes producing training batches; -1 = one per core but one
  # on GPU/TPU, none on CPU.
  c.finetune.decode_processes = 0

  # ---- Device mesh (divita_jax/sharding.py) ----
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1)  # Sizes of mesh axes; -1 fills with the devices.
  c.mesh.axes = ("data", "model")
  # Logical axis name -> mesh axis (None = replicated).
  c.mesh.rules = (
    ("batch", "data"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("clips", None),
    ("classes", None),
  )

  if "runlocal" in variants:
    c.dataset.num_trailers = 48
    c.train.max_epochs = 5
  if "trailers12k" in variants:
    c.dataset.config = "raw"
    c.clips.frames_per_clip = 24
    c.clips.fps = 24.0
    c.backbones.image.variant = "B/16"
    c.backbones.image.resolution = 224
    c.backbones.video.variant = "B/16x2"
    c.backbones.video.resolution = 224
    c.backbones.image.batch_size = 64
    c.backbones.video.batch_size = 8
    c.backbones.image.dtype = "auto"  # bf16 on accelerators.
    c.backbones.video.dtype = "auto"

  _backbone_pair(c, variants)
  if "reps" in variants:  # Table 6 from the official zarr representations.
    c.dataset.config = "reps"
    c.reps.zarr_image = "trailers_i_swin_fpc24.zarr"
    c.reps.zarr_video = "trailers_ik_swin_fps24_fpc24.zarr"
  if "image_only" in variants:
    c.model.branches = ("image",)
  if "video_only" in variants:
    c.model.branches = ("video",)
  if "audio" in variants:  # The soundtrack as a third branch.
    c.model.branches = (*c.model.branches, "audio")
  if {"audio", "audio_only"} & variants:
    _audio(c, variants)
  if "audio_only" in variants:
    c.model.branches = ("audio",)
  if "early_fusion" in variants:
    c.model.fusion = "early"
  if "fixed_clips" in variants:
    c.clips.segmentation = "fixed"
  if "finetune" in variants:
    _finetune(c, "trailers12k" in variants)
  return c


# Audio checkpoints of `:trailers12k,...,audio[,whisper]`, written by
# `python -m divita_jax.convert --source hf_ast | hf_whisper` from the hub
# folders MIT/ast-finetuned-audioset-10-10-0.4593 and openai/whisper-base.
AUDIO_CHECKPOINTS = {
  "ast": "ast_audioset_10_10_0.4593",
  "whisper": "whisper_base",
}


def preset_checkpoint(c, folder: str):
  """<c.checkpoints_dir>/<folder>, following later overrides of
  checkpoints_dir (`--config.checkpoints_dir=DIR`)."""
  return c.get_ref("checkpoints_dir") + f"/{folder}"


def _audio(c, variants) -> None:
  """The audio branch's encoder: AST, or Whisper (`whisper`) pooled over
  each clip's window of its 30-s chunks; converted on real trailers."""
  a = c.backbones.audio
  if "whisper" in variants:
    a.kind, a.pooling = "whisper", "chunks"
  if "trailers12k" in variants:
    a.checkpoint = preset_checkpoint(c, AUDIO_CHECKPOINTS[a.kind])
    a.dtype = "auto"
    a.batch_size = 8
    # AST hears 10.24 s: the window it was trained on, centred on the clip.
    c.clips.audio_seconds = 10.24 if a.kind == "ast" else 2.0


def _finetune(c, real: bool) -> None:
  """End-to-end fine-tuning; parameters and optimizer state sharded over
  `fsdp` (every device), the batch over data x fsdp; `model` (tensor
  parallelism by the rules) is 1 unless set."""
  c.train.mode = "finetune"
  c.mesh.shape = (1, -1, 1)
  c.mesh.axes = ("data", "fsdp", "model")
  c.finetune.schedule = "cosine"
  if real:  # Pods: batch sizes (and eval_microbatches) to the devices.
    c.train.max_epochs = 20
    c.train.batch_size = 64
    c.train.eval_batch_size = 64
    c.finetune.freeze_layers = 1  # Patch embedding / stem.
    c.finetune.layer_decay = 0.75
    c.finetune.remat = "dots"
    c.finetune.dtype = "auto"
    c.finetune.decode_processes = -1
  else:  # Synthetic, tiny random backbones: minutes on a CPU.
    c.train.max_epochs = 8
    c.train.batch_size = 16
    c.train.eval_batch_size = 16
    c.train.learning_rate = 1e-3
    c.finetune.backbone_lr_scale = 1.0
  c.train.early_stop_patience = c.train.max_epochs  # Cosine runs to the end.


# Table 6 backbone pairs from raw trailers: (kind, converted checkpoint
# folder under checkpoints_dir, resolution) per branch. Checkpoints are
# written by `python -m divita_jax.convert` (README, "Getting the real
# data" names the file and the command for each folder).
TABLE6 = {
  "vit": (
    ("vit", "vit_b16_in21k_in1k", 224),
    ("vivit", "vivit_b16x2_k400", 224),
  ),
  "swin": (  # The paper's best pair.
    ("swin", "swin_t_in1k", 224),
    ("swin3d", "swin3d_t_k400", 224),
  ),
  "shufflenet": (  # The light pair of the efficiency claim.
    ("shufflenet", "shufflenet_v2_x1_0_in1k", 224),
    ("shufflenet3d", "shufflenetv2_3d_1.0x_kinetics", 112),
  ),
  "resnet": (
    ("resnet", "resnet50_in1k", 224),
    ("r2plus1d", "r2plus1d_18_k400", 112),
  ),
  # Past the paper (README, "Backbones past the paper"): SigLIP B/16 frames
  # + VideoPrism-B clips (16 frames at 288 px), both frozen-probe leaders.
  "modern": (
    ("siglip", "siglip_base_patch16_224", 224),
    ("videoprism", "videoprism_base_f16r288", 288),
  ),
}


# The same pairs as small random-init variants, for the synthetic data.
TINY = {
  "vit": (("vit", "tiny/8"), ("vivit", "tiny/8")),
  "swin": (("swin", "tiny"), ("swin3d", "tiny")),
  "shufflenet": (("shufflenet", "0.5"), ("shufflenet3d", "0.25")),
  "resnet": (("resnet", "resnet18"), ("r2plus1d", "r2plus1d_18")),
  "modern": (("siglip", "tiny/8"), ("videoprism", "tiny/8")),
}

# One backbone past the paper alone, its branch only: name -> (branch, kind,
# converted checkpoint folder and resolution with `trailers12k`, tiny variant).
SINGLE = {
  "siglip": ("image", "siglip", "siglip_base_patch16_224", 224),
  "dinov2": ("image", "dinov2", "dinov2_base", 224),
  "dinov3": ("image", "dinov3", "dinov3_vitb16", 224),
  "vjepa2": ("video", "vjepa2", "vjepa2_vitl_fpc16_256", 256),
  "videoprism": (
    "video",
    "videoprism",
    "videoprism_base_f16r288",
    288,
  ),
}


def _backbone_pair(c, variants: set[str]) -> None:
  """The named backbone pair (or one SINGLE backbone alone): converted
  checkpoints with `trailers12k`, tiny random-init variants on the
  synthetic data."""
  pairs = sorted(variants & (set(TABLE6) | set(SINGLE)))
  if len(pairs) > 1:
    raise ValueError(f"Pick one backbone pair or backbone, got {pairs}.")
  if pairs and pairs[0] in SINGLE:
    branch, kind, checkpoint, resolution = SINGLE[pairs[0]]
    b = c.backbones[branch]
    b.kind, b.variant = kind, "tiny/8"
    if "trailers12k" in variants:
      b.checkpoint = preset_checkpoint(c, checkpoint)
      b.resolution = resolution
    c.model.branches = (branch,)
    return
  name = pairs[0] if pairs else "vit"
  for i, branch in enumerate(("image", "video")):
    b = c.backbones[branch]
    if "trailers12k" in variants:
      b.kind, folder, b.resolution = TABLE6[name][i]
      b.checkpoint = preset_checkpoint(c, folder)
    else:
      b.kind, b.variant = TINY[name][i]
