"""Audio, the third modality: decode and validate clips, store them in shards, log-mel features.

Clips are decoded with ``soundfile`` (libsndfile: WAV, FLAC, OGG/Vorbis). torchaudio ships only
for torches older than the pinned one, so the features are ``torch.stft`` + a mel filterbank
built here from the Slaney (default) or HTK mel scale, as librosa documents them
(``librosa.filters.mel``, ``librosa.hz_to_mel``).

The path of a clip through the stages:
- ingest (``ingest_audio``): each caption row's ``ingest.audio_column`` names a clip relative to
  the data root; every distinct clip is validated (decodes, duration, sample rate, channels).
  A rejected clip goes to rejects.jsonl (kind ``audio``) and its rows keep their image and
  caption with ``audio_path`` null: a missing modality is masked downstream, never an error.
- align carries ``audio_path`` into pairs.parquet; shard (``encode_flac``) stores the clip as a
  mono ``SAMPLE_RATE`` FLAC member of the sample; the loader turns it into a log-mel
  spectrogram (``log_mel``) plus a presence flag.
A collection without ``audio_column`` never reaches this module: its outputs are unchanged.
"""

from __future__ import annotations

import io
import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mmpipe.config import AudioParams
from mmpipe.io import atomic_path, resolve_inside

# Every clip in a shard is mono at this rate; the loader's features assume it.
SAMPLE_RATE = 16_000
# log-mel features: 25 ms windows every 10 ms, 64 bands up to Nyquist, clips cropped or padded
# to CLIP_SECONDS (the encoder sees a fixed (N_MELS, FRAMES) picture)
N_FFT = 400
HOP = 160
N_MELS = 64
CLIP_SECONDS = 4.0
FRAMES = int(CLIP_SECONDS * SAMPLE_RATE) // HOP + 1
LOG_FLOOR = 1e-6

# reject reasons of kind "audio" (ingest.REJECT_REASONS holds the shared ones too)
AUDIO_REJECT_REASONS = {
    "not_audio": "the file's content is not an audio format soundfile knows",
    "audio_too_long": "clip longer than ingest.audio.max_seconds",
    "audio_too_short": "clip shorter than ingest.audio.min_seconds (or no samples)",
    "bad_sample_rate": "sample rate outside ingest.audio.min/max_sample_rate",
    "too_many_channels": "more channels than ingest.audio.max_channels",
    "missing_audio": "the row's audio file does not exist (image and caption kept, audio masked)",
}


# ----------------------------------------------------------------------------- validation


def check_audio_bytes(data: bytes, p: AudioParams) -> tuple[str | None, str, dict[str, Any]]:
    """Decode fully; return (reason or None, detail, {sample_rate, channels, seconds, format}).

    The header limits (rate, channels, duration) are checked before any sample is decoded.
    """
    import soundfile as sf

    try:
        fh = sf.SoundFile(io.BytesIO(data))
    except sf.LibsndfileError as exc:
        if "recognised" in str(exc) or "unknown format" in str(exc).lower():
            return "not_audio", "soundfile cannot identify the format", {}
        return "corrupt", f"cannot open: {exc}", {}
    except Exception as exc:  # noqa: BLE001 - any decoder failure on open is a corrupt header
        return "corrupt", f"{type(exc).__name__}: {exc}", {}
    with fh:
        rate, channels, frames = fh.samplerate, fh.channels, fh.frames
        info = {"sample_rate": rate, "channels": channels, "format": fh.format}
        info["seconds"] = frames / rate if rate > 0 else 0.0
        header = _header_reason(rate, channels, info["seconds"], p)
        if header is not None:
            return *header, info
        try:
            samples = fh.read(dtype="float32", always_2d=True)
        except Exception as exc:  # noqa: BLE001 - libsndfile raises RuntimeError, LibsndfileError
            return "corrupt", f"{type(exc).__name__}: {exc}", info
    if len(samples) == 0:
        return "audio_too_short", "no samples", info
    if not np.isfinite(samples).all():
        return "corrupt", "samples are not finite (NaN or inf)", info
    return None, "", info


def _header_reason(
    rate: int, channels: int, seconds: float, p: AudioParams
) -> tuple[str, str] | None:
    if not p.min_sample_rate <= rate <= p.max_sample_rate:
        limits = f"[{p.min_sample_rate}, {p.max_sample_rate}]"
        return "bad_sample_rate", f"{rate} Hz outside ingest.audio sample rates {limits}"
    if channels > p.max_channels:
        return "too_many_channels", f"{channels} channels > ingest.audio.max_channels"
    if seconds > p.max_seconds:
        return "audio_too_long", f"{seconds:.2f}s > ingest.audio.max_seconds {p.max_seconds:g}"
    if seconds < p.min_seconds:
        return "audio_too_short", f"{seconds:.3f}s < ingest.audio.min_seconds {p.min_seconds:g}"
    return None


def validate_audio(root: Path, rel: str, p: AudioParams) -> tuple[str | None, str]:
    """Validate the clip at ``rel`` (relative to ``root``): (reason or None, detail)."""
    resolved = resolve_inside(root, rel)
    if resolved is None:
        return "path_escapes_root", f"{rel} resolves outside the data root"
    if not resolved.is_file():
        return "missing_audio", f"audio file {rel} does not exist"
    ext = os.path.splitext(rel)[1].lower()
    if ext not in {e.lower() for e in p.extensions}:
        return "bad_extension", f"extension {ext!r} not in ingest.audio.extensions"
    try:
        data = resolved.read_bytes()
    except OSError as exc:
        return "corrupt", f"cannot read: {exc}"
    if not data:
        return "zero_bytes", "file is empty"
    reason, detail, _ = check_audio_bytes(data, p)
    return reason, detail


# ----------------------------------------------------------------------------- ingest


def audio_schema(schema: pa.Schema) -> pa.Schema:
    """records.parquet's schema with the ``audio_path`` column (relative to the data root)."""
    return schema.append(pa.field("audio_path", pa.string()))


def ingest_audio(
    records: Path, root: Path, column: str, p: AudioParams, reject: Any
) -> dict[str, int]:
    """Give each record of ``records`` its validated clip (``audio_path``; null = masked).

    The clip's path is read from the row's ``column``, which the folder reader left in
    ``meta`` (removed from there). Each distinct path is validated once; a rejected one is
    reported through ``reject(file, reason, detail)`` once. Rewrites ``records`` in place
    (atomically). Returns the clip counts: files seen = accepted + rejected.
    """
    outcome: dict[str, str | None] = {}  # rel -> reason (None = accepted)
    counts = {"captions_with_audio": 0, "captions_without_audio": 0}
    source = pq.ParquetFile(records)
    schema = audio_schema(source.schema_arrow)
    with atomic_path(records) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for batch in source.iter_batches(batch_size=2048):
            table = pa.Table.from_batches([batch])
            metas, paths = [], []
            for meta_text in table["meta"].to_pylist():
                meta = json.loads(meta_text or "{}")
                ref = meta.pop(column, None)
                rel = _clip(root, ref, p, outcome, reject)
                counts["captions_with_audio" if rel else "captions_without_audio"] += 1
                paths.append(rel)
                metas.append(json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str))
            table = table.set_column(table.schema.get_field_index("meta"), "meta", [metas])
            table = table.append_column("audio_path", pa.array(paths, pa.string()))
            writer.write_table(table.cast(schema))
    rejected = sum(r is not None for r in outcome.values())
    return {
        "seen": len(outcome),
        "accepted": len(outcome) - rejected,
        "rejected": rejected,
        **counts,
    }


def _clip(
    root: Path, ref: Any, p: AudioParams, outcome: dict[str, str | None], reject: Any
) -> str | None:
    """The accepted clip path of one row's reference, or None (no reference, or rejected)."""
    if ref is None or (isinstance(ref, float) and math.isnan(ref)) or ref == "":
        return None
    ref = str(ref)
    # stored relative to the root, as image paths are (an absolute path inside it is accepted)
    rel = os.path.normpath(os.path.relpath(ref, root) if os.path.isabs(ref) else ref)
    rel = rel.replace(os.sep, "/")
    if rel not in outcome:
        reason, detail = validate_audio(root, rel, p)
        outcome[rel] = reason
        if reason is not None:
            reject(rel, reason, detail)
    return rel if outcome[rel] is None else None


# ----------------------------------------------------------------------------- shard


def load_mono(path: str | Path, rate: int = SAMPLE_RATE) -> np.ndarray:
    """The clip at ``path`` as mono float32 at ``rate`` (channels averaged, polyphase resample)."""
    import soundfile as sf

    samples, source_rate = sf.read(str(path), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    if source_rate != rate:
        from scipy.signal import resample_poly

        g = math.gcd(rate, source_rate)
        mono = resample_poly(mono, rate // g, source_rate // g).astype(np.float32)
    return np.clip(mono, -1.0, 1.0)


def encode_flac(path: str | Path) -> bytes:
    """The shard member of a clip: mono ``SAMPLE_RATE`` 16-bit FLAC (lossless, deterministic)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, load_mono(path), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def decode_flac(data: bytes) -> np.ndarray:
    """A shard's FLAC member -> mono float32 samples at SAMPLE_RATE."""
    import soundfile as sf

    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise ValueError(f"audio member at {rate} Hz, expected {SAMPLE_RATE}")
    return samples.mean(axis=1)


# ----------------------------------------------------------------------------- features


def hz_to_mel(hz: np.ndarray | float, htk: bool = False) -> np.ndarray:
    """Hz -> mel. HTK: 2595 log10(1 + f/700). Slaney: linear below 1 kHz (3 bands per 200 Hz),
    logarithmic above (27 bands per factor 6.4), as ``librosa.hz_to_mel``."""
    f = np.asarray(hz, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + f / 700.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    linear = f / f_sp
    log_part = min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log_part, linear)


def mel_to_hz(mel: np.ndarray | float, htk: bool = False) -> np.ndarray:
    """mel -> Hz, the inverse of ``hz_to_mel``."""
    m = np.asarray(mel, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(
    rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None,
    htk: bool = False,
) -> np.ndarray:  # fmt: skip
    """(n_mels, n_fft // 2 + 1) triangular filters, Slaney-normalised (each has area 1 in Hz),
    as ``librosa.filters.mel(norm="slaney")``."""
    fmax = rate / 2 if fmax is None else fmax
    fft_hz = np.linspace(0.0, rate / 2, 1 + n_fft // 2)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin, htk), hz_to_mel(fmax, htk), n_mels + 2), htk)
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    return weights * (2.0 / (edges[2:] - edges[:-2]))[:, None]


@lru_cache(maxsize=4)
def _filterbank_tensor(rate: int, n_fft: int, n_mels: int) -> Any:
    import torch

    return torch.from_numpy(mel_filterbank(rate, n_fft, n_mels).astype(np.float32))


def fixed_length(samples: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` samples, zero-padded at the end when shorter."""
    out = np.zeros(n, dtype=np.float32)
    out[: min(n, len(samples))] = samples[:n]
    return out


def log_mel(samples: np.ndarray | Any, rate: int = SAMPLE_RATE) -> Any:
    """Mono samples (T,) or (B, T) -> natural-log mel power spectrogram (..., N_MELS, frames).

    ``torch.stft`` with a periodic Hann window of N_FFT, hop HOP, centred (reflect padding).
    """
    import torch

    wave = torch.as_tensor(samples, dtype=torch.float32)
    spec = torch.stft(
        wave, N_FFT, hop_length=HOP, window=torch.hann_window(N_FFT), center=True,
        return_complex=True,
    )  # fmt: skip
    power = spec.real**2 + spec.imag**2  # (..., n_fft // 2 + 1, frames)
    mel = torch.matmul(_filterbank_tensor(rate, N_FFT, N_MELS), power)
    return torch.log(mel + LOG_FLOOR)


def clip_features(data: bytes) -> Any:
    """A shard's FLAC member -> (1, N_MELS, FRAMES) float32 log-mel of its first CLIP_SECONDS."""
    samples = fixed_length(decode_flac(data), int(CLIP_SECONDS * SAMPLE_RATE))
    return log_mel(samples).unsqueeze(0).numpy()
