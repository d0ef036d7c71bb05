"""Image preprocessing (standardisation, KIP's ZCA, RCIG/FRePo's channel ZCA), centred one-hot labels and class-balanced sampling.

Preprocessing kinds (`make_preprocessor`, `--preprocess`):
  * 'standardize': per-channel standardisation with the train split's mean and std.
  * 'kip_zca' (alias 'zca', the name older run configs use): KIP's ZCA. Each image is centred
    on its own mean and scaled to unit norm, then whitened with the train split's covariance,
    regularised by strength * tr(cov) / d (strength 0.1 by default).
  * 'channel_zca': RCIG's and FRePo's ZCA. Per-channel standardisation with the train split's
    mean and std, no per-image step, then whitened with the second-moment matrix X^T X / n of
    the standardised train split, regularised by strength * tr / d. Grayscale images are only
    standardised (RCIG does not whiten MNIST / Fashion-MNIST).
  * 'none': pixels as they are.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

PREPROCESSOR_KINDS = ('none', 'standardize', 'kip_zca', 'channel_zca', 'zca')
# Names accepted for backward compatibility: 'zca' is what run configs before 'kip_zca' say.
ALIASES = {'zca': 'kip_zca'}
KIP_ZCA_KINDS = ('kip_zca', 'zca')
# Rows per chunk when streaming images through float64 maths: bounds memory on 50k CIFAR images.
_CHUNK = 4096


# --------------------------------------------------------------------------------------------
# Per-channel standardisation.


def standardize_fit(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float32, shape (C,)) of NHWC images; a (near-)constant channel gets std 1."""
    x_train = np.asarray(x_train)
    channels = x_train.shape[-1]
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for start in range(0, x_train.shape[0], _CHUNK):
        chunk = x_train[start:start + _CHUNK].reshape(-1, channels).astype(np.float64)
        total += chunk.sum(axis=0)
        count += chunk.shape[0]
    mean = total / count
    # Second pass around the mean: no cancellation, unlike E[x^2] - E[x]^2.
    for start in range(0, x_train.shape[0], _CHUNK):
        chunk = x_train[start:start + _CHUNK].reshape(-1, channels).astype(np.float64)
        total_sq += ((chunk - mean) ** 2).sum(axis=0)
    std = np.sqrt(total_sq / count)
    # Round-off leaves a constant channel a tiny nonzero std; dividing by it would blow up.
    std = np.where(std > 1e-6 * np.maximum(1.0, np.abs(mean)), std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def standardize_apply(x: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    mean, std = stats
    return ((np.asarray(x, np.float64) - mean) / std).astype(np.float32)


def standardize_inverse(z: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    mean, std = stats
    return (np.asarray(z, np.float64) * std + mean).astype(np.float32)


# --------------------------------------------------------------------------------------------
# ZCA whitening as in KIP / RCIG.


@dataclasses.dataclass(frozen=True, eq=False)
class ZCA:
    """A fitted ZCA transform over flattened images of shape image_shape.

    per_image=True (KIP's): each image is first centred on its own mean and scaled to unit
    norm (`normalize_images`), and `mean` is the feature mean of those. per_image=False (the
    channel ZCA's): images enter as they are (already standardised per channel) and mean is 0.
    """
    mean: np.ndarray       # (d,) feature mean subtracted before whitening
    whiten: np.ndarray     # (d, d) U diag(1/sqrt(s + reg)) U^T
    unwhiten: np.ndarray   # (d, d) U diag(sqrt(s + reg)) U^T, the inverse of whiten
    strength: float
    image_shape: tuple[int, ...]
    per_image: bool = True


def normalize_images(x: np.ndarray) -> np.ndarray:
    """Flattens each image, subtracts its own mean and scales it to unit L2 norm: (N, d) float64.

    An all-constant image has no direction and stays all zeros.
    """
    flat = np.asarray(x, np.float64).reshape(len(x), -1)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.where(norms > 0, norms, 1.0)


def _flat_rows(x: np.ndarray, per_image: bool) -> np.ndarray:
    """(N, d) float64 rows that ZCA whitens: per-image normalised (KIP) or as they are."""
    return normalize_images(x) if per_image else np.asarray(x, np.float64).reshape(len(x), -1)


def zca_fit(x_train: np.ndarray, strength: float = 0.1, per_image: bool = True) -> ZCA:
    """Fits ZCA on NHWC train images: eigendecomposition (float64) of their covariance.

    per_image=True (KIP's ZCA): rows are the per-image normalised images and the covariance is
    centred on their mean. per_image=False (the channel ZCA's whitening step, on images already
    standardised per channel): the uncentred second-moment matrix X^T X / n, as RCIG's and
    FRePo's code compute it. reg = strength * tr / d is added to every eigenvalue before the
    inverse square root.
    """
    return _zca_fit_rows(x_train, strength, per_image, stats=None)


def _zca_fit_rows(x_train: np.ndarray, strength: float, per_image: bool,
                  stats: tuple[np.ndarray, np.ndarray] | None) -> ZCA:
    """zca_fit on x_train, standardised chunk by chunk with `stats` first when given."""
    x_train = np.asarray(x_train)
    if x_train.ndim != 4 or len(x_train) < 2:
        raise ValueError(f'zca_fit needs NHWC images and at least 2 of them, got shape {x_train.shape}')
    if strength < 0:
        raise ValueError(f'zca strength must be >= 0, got {strength}')
    d = int(np.prod(x_train.shape[1:]))
    total = np.zeros(d)
    gram = np.zeros((d, d))
    for start in range(0, len(x_train), _CHUNK):
        chunk = x_train[start:start + _CHUNK]
        if stats is not None:
            chunk = standardize_apply(chunk, stats)
        flat = _flat_rows(chunk, per_image)
        total += flat.sum(axis=0)
        gram += flat.T @ flat
    n = len(x_train)
    mean = total / n if per_image else np.zeros(d)
    # The normalised rows have unit norm, so gram/n - mean mean^T loses no meaningful precision.
    cov = gram / n - np.outer(mean, mean)
    eigvals, eigvecs = np.linalg.eigh(cov)
    eigvals = np.clip(eigvals, 0.0, None)  # round-off can leave tiny negative eigenvalues
    reg = strength * np.trace(cov) / d
    shifted = eigvals + reg
    if np.any(shifted <= 0):
        raise ValueError('zca_fit: the covariance is singular and strength is 0: use strength > 0 '
                         'or more train images than pixels')
    whiten = (eigvecs / np.sqrt(shifted)) @ eigvecs.T
    unwhiten = (eigvecs * np.sqrt(shifted)) @ eigvecs.T
    return ZCA(mean=mean, whiten=whiten, unwhiten=unwhiten, strength=float(strength),
               image_shape=tuple(int(s) for s in x_train.shape[1:]), per_image=per_image)


def kip_zca_fit(x_train: np.ndarray, strength: float = 0.1) -> ZCA:
    """KIP's ZCA: per-image centring and unit norm, then ZCA regularised by strength * tr / d."""
    return zca_fit(x_train, strength, per_image=True)


def channel_zca_fit(x_train: np.ndarray, strength: float = 0.1
                    ) -> tuple[tuple[np.ndarray, np.ndarray], ZCA | None]:
    """RCIG's / FRePo's channel ZCA: ((mean, std), zca) fitted on NHWC train images.

    The per-channel mean and std are the train split's (`standardize_fit`: for CIFAR-10 the
    dataset's fixed statistics); the ZCA is fitted on the standardised train split with no
    per-image step. Grayscale images (one channel) are only standardised: zca is None.
    Apply with `channel_zca_apply`.
    """
    stats = standardize_fit(x_train)
    if np.shape(x_train)[-1] == 1:
        return stats, None
    return stats, _zca_fit_rows(x_train, strength, per_image=False, stats=stats)


def channel_zca_apply(x: np.ndarray, stats: tuple[np.ndarray, np.ndarray], zca: ZCA | None) -> np.ndarray:
    """Per-channel standardisation with `stats`, then (for RGB) the channel ZCA's whitening."""
    z = standardize_apply(x, stats)
    return z if zca is None else zca_apply(z, zca)


def _check_shape(x: np.ndarray, zca: ZCA) -> None:
    if tuple(x.shape[1:]) != zca.image_shape:
        raise ValueError(f'images of shape {x.shape[1:]} do not match the ZCA fitted on {zca.image_shape}')


def zca_apply(x: np.ndarray, zca: ZCA) -> np.ndarray:
    """Normalises each image (KIP's ZCA only; see normalize_images), centres and whitens it:
    NHWC in, NHWC float32 out."""
    x = np.asarray(x)
    _check_shape(x, zca)
    out = np.empty(x.shape, np.float32)
    for start in range(0, len(x), _CHUNK):
        flat = _flat_rows(x[start:start + _CHUNK], zca.per_image) - zca.mean
        out[start:start + _CHUNK] = (flat @ zca.whiten).reshape((-1,) + zca.image_shape)
    return out


def zca_inverse(z: np.ndarray, zca: ZCA) -> np.ndarray:
    """Undoes whitening and centring: returns the per-image normalised images (float32 NHWC),
    or for a channel ZCA (per_image=False) the standardised images.

    The per-image normalisation (own mean removed, unit norm) cannot be undone: brightness and
    contrast are lost. Pass the result to `to_display` to get pictures in [0, 1].
    """
    z = np.asarray(z)
    _check_shape(z, zca)
    flat = np.asarray(z, np.float64).reshape(len(z), -1) @ zca.unwhiten + zca.mean
    return flat.reshape(z.shape).astype(np.float32)


def to_display(x: np.ndarray) -> np.ndarray:
    """Rescales each image to span [0, 1] (min-max over its pixels); a constant image becomes 0.5."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(1, x.ndim))
    low = x.min(axis=axes, keepdims=True)
    span = x.max(axis=axes, keepdims=True) - low
    scaled = np.where(span > 0, (x - low) / np.where(span > 0, span, 1.0), 0.5)
    return scaled.astype(np.float32)


# --------------------------------------------------------------------------------------------
# A preprocessor callers can apply, invert and save.


@dataclasses.dataclass(frozen=True, eq=False)
class Preprocessor:
    """One of PREPROCESSOR_KINDS with its fitted parameters; apply() maps pixels to model inputs.

    'standardize' has stats; 'kip_zca' / 'zca' has zca (per_image); 'channel_zca' has stats and,
    for RGB, zca (not per_image); 'none' has neither.
    """
    kind: str
    stats: tuple[np.ndarray, np.ndarray] | None = None
    zca: ZCA | None = None

    def __post_init__(self):
        if self.kind not in PREPROCESSOR_KINDS:
            raise ValueError(f'unknown preprocessing {self.kind!r}: choose one of {", ".join(PREPROCESSOR_KINDS)}')
        needs_stats = self.kind in ('standardize', 'channel_zca')
        if needs_stats != (self.stats is not None):
            raise ValueError(f'a {self.kind!r} preprocessor needs exactly its own parameters')
        if self.kind in KIP_ZCA_KINDS:
            zca_ok = self.zca is not None and self.zca.per_image
        elif self.kind == 'channel_zca':
            zca_ok = self.zca is None or not self.zca.per_image
        else:
            zca_ok = self.zca is None
        if not zca_ok:
            raise ValueError(f'a {self.kind!r} preprocessor needs exactly its own parameters')

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.kind == 'standardize':
            return standardize_apply(x, self.stats)
        if self.kind in KIP_ZCA_KINDS:
            return zca_apply(x, self.zca)
        if self.kind == 'channel_zca':
            return channel_zca_apply(x, self.stats, self.zca)
        return np.asarray(x, np.float32)

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """Back to displayable pixels in [0, 1] (for KIP's ZCA: up to each image's brightness and contrast)."""
        if self.kind == 'standardize' or (self.kind == 'channel_zca' and self.zca is None):
            return np.clip(standardize_inverse(z, self.stats), 0.0, 1.0)
        if self.kind == 'channel_zca':
            return np.clip(standardize_inverse(zca_inverse(z, self.zca), self.stats), 0.0, 1.0)
        if self.kind in KIP_ZCA_KINDS:
            return to_display(zca_inverse(z, self.zca))
        return np.clip(np.asarray(z, np.float32), 0.0, 1.0)

    def to_dict(self, prefix: str = 'preprocess_') -> dict[str, np.ndarray]:
        """Arrays to store in an .npz (np.savez(path, **p.to_dict())); from_dict reads them back."""
        arrays = {'kind': np.array(self.kind)}
        if self.stats is not None:
            arrays['mean'], arrays['std'] = self.stats
        if self.zca is not None:
            arrays.update(zca_mean=self.zca.mean, zca_whiten=self.zca.whiten, zca_unwhiten=self.zca.unwhiten,
                          zca_strength=np.array(self.zca.strength), zca_image_shape=np.array(self.zca.image_shape),
                          zca_per_image=np.array(self.zca.per_image))
        return {prefix + key: value for key, value in arrays.items()}

    @classmethod
    def from_dict(cls, arrays: Mapping[str, np.ndarray], prefix: str = 'preprocess_') -> Preprocessor:
        kind = str(np.asarray(arrays[prefix + 'kind']).item())
        stats = zca = None
        if prefix + 'mean' in arrays:
            stats = (np.asarray(arrays[prefix + 'mean']), np.asarray(arrays[prefix + 'std']))
        if prefix + 'zca_whiten' in arrays:
            # Files written before the channel ZCA have no zca_per_image: theirs is KIP's.
            per_image = bool(np.asarray(arrays[prefix + 'zca_per_image'])) if prefix + 'zca_per_image' in arrays else True
            zca = ZCA(mean=np.asarray(arrays[prefix + 'zca_mean']), whiten=np.asarray(arrays[prefix + 'zca_whiten']),
                      unwhiten=np.asarray(arrays[prefix + 'zca_unwhiten']),
                      strength=float(np.asarray(arrays[prefix + 'zca_strength'])),
                      image_shape=tuple(int(s) for s in np.asarray(arrays[prefix + 'zca_image_shape'])),
                      per_image=per_image)
        return cls(kind, stats=stats, zca=zca)


def make_preprocessor(kind: str, x_train: np.ndarray, zca_strength: float = 0.1) -> Preprocessor:
    """Fits the preprocessing `kind` (one of PREPROCESSOR_KINDS; see the module docstring) on the
    train images. The kind is kept as given ('zca' stays 'zca', computing exactly 'kip_zca')."""
    if kind not in PREPROCESSOR_KINDS:
        raise ValueError(f'unknown preprocessing {kind!r}: choose one of {", ".join(PREPROCESSOR_KINDS)}')
    if kind == 'standardize':
        return Preprocessor(kind, stats=standardize_fit(x_train))
    if kind in KIP_ZCA_KINDS:
        return Preprocessor(kind, zca=kip_zca_fit(x_train, strength=zca_strength))
    if kind == 'channel_zca':
        stats, zca = channel_zca_fit(x_train, strength=zca_strength)
        return Preprocessor(kind, stats=stats, zca=zca)
    return Preprocessor(kind)


# --------------------------------------------------------------------------------------------
# Labels and class-balanced sampling.


def one_hot_centered(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """One-hot rows minus 1/C (float32, (N, C)): each row sums to 0, as KIP/RCIG regress on."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise ValueError(f'labels must be 1-D ints in 0..{num_classes - 1}, got shape {labels.shape}')
    return (np.eye(num_classes, dtype=np.float32)[labels] - np.float32(1.0 / num_classes)).astype(np.float32)


def _class_members(labels: np.ndarray, num_classes: int | None) -> list[np.ndarray]:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f'labels must be a non-empty 1-D array, got shape {labels.shape}')
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


def _draw(members: list[np.ndarray], counts: np.ndarray, rng: np.random.Generator, what: str) -> np.ndarray:
    picked = []
    for c, (indices, count) in enumerate(zip(members, counts)):
        if count > len(indices):
            raise ValueError(f'class {c} has {len(indices)} examples, fewer than the {count} {what} asks for')
        picked.append(rng.choice(indices, size=int(count), replace=False))
    return np.concatenate(picked).astype(np.int64)


def class_balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator,
                           num_classes: int | None = None) -> np.ndarray:
    """per_class indices of each class, drawn without replacement: class 0's first (in draw order), then 1, ...

    num_classes defaults to max(labels) + 1.
    """
    members = _class_members(labels, num_classes)
    return _draw(members, np.full(len(members), per_class), rng, f'per_class={per_class}')


def class_balanced_batch(labels: np.ndarray, batch_size: int, rng: np.random.Generator,
                         num_classes: int | None = None) -> np.ndarray:
    """batch_size distinct indices, as equal across classes as possible, grouped by class.

    Each class gets batch_size // C; the remainder goes one each to randomly chosen classes.
    """
    members = _class_members(labels, num_classes)
    counts = np.full(len(members), batch_size // len(members))
    counts[rng.choice(len(members), size=batch_size % len(members), replace=False)] += 1
    return _draw(members, counts, rng, f'batch_size={batch_size}')
