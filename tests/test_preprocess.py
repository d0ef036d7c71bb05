"""Tests of ntkdd.common.preprocess: standardisation, both ZCAs, preprocessor save/load, labels, sampling."""
from __future__ import annotations

import numpy as np
import pytest

from ntkdd.common import preprocess as pp


def images(n=400, shape=(3, 3, 2), seed=0) -> np.ndarray:
    """Correlated pixels in [0, 1]: a random mixing of independent noise, so whitening has work to do."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    flat = rng.random((n, d)) @ rng.random((d, d)) / d
    return flat.reshape((n,) + shape).astype(np.float32)


def test_standardize_stats_and_round_trip():
    rng = np.random.default_rng(1)
    x = rng.random((50, 4, 4, 3)).astype(np.float32) * [1.0, 0.5, 0.2] + [0.0, 0.1, 0.3]
    x[..., 2] = 0.7  # a constant channel must not divide by zero
    mean, std = pp.standardize_fit(x)
    assert mean.dtype == np.float32 and mean.shape == (3,)
    np.testing.assert_allclose(mean, x.reshape(-1, 3).mean(0), rtol=1e-5)
    np.testing.assert_allclose(std[:2], x.reshape(-1, 3).std(0)[:2], rtol=1e-5)
    assert std[2] == 1.0
    z = pp.standardize_apply(x, (mean, std))
    np.testing.assert_allclose(z[..., :2].reshape(-1, 2).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(z[..., :2].reshape(-1, 2).std(0), 1, rtol=1e-4)
    np.testing.assert_allclose(pp.standardize_inverse(z, (mean, std)), x, atol=1e-6)


def test_normalize_images_zero_mean_unit_norm():
    flat = pp.normalize_images(images(10))
    np.testing.assert_allclose(flat.mean(1), 0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(flat, axis=1), 1, rtol=1e-12)
    assert not pp.normalize_images(np.full((1, 2, 2, 1), 0.3)).any()


def test_zca_whitens_to_identity_with_tiny_strength():
    x = images(2000)
    zca = pp.zca_fit(x, strength=1e-9)
    z = pp.zca_apply(x, zca).reshape(len(x), -1).astype(np.float64)
    cov = z.T @ z / len(z)
    # Per-image normalisation removes one direction (the constant image): that eigenvalue is ~0.
    d = cov.shape[0]
    eigvals = np.linalg.eigvalsh(cov)
    assert eigvals[0] < 1e-3
    np.testing.assert_allclose(eigvals[1:], 1, atol=1e-3)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-6)
    assert zca.whiten.shape == (d, d) and zca.image_shape == (3, 3, 2)


def test_zca_regularised_covariance_pattern():
    x = images(1000)
    zca = pp.zca_fit(x, strength=0.1)
    flat = pp.normalize_images(x) - zca.mean
    cov = flat.T @ flat / len(flat)
    reg = 0.1 * np.trace(cov) / cov.shape[0]
    eigvals = np.linalg.eigvalsh(cov)
    z = pp.zca_apply(x, zca).reshape(len(x), -1).astype(np.float64)
    # Whitened eigenvalues are s / (s + reg): below 1, and the same order as before.
    np.testing.assert_allclose(np.linalg.eigvalsh(z.T @ z / len(z)), eigvals / (eigvals + reg), atol=1e-5)
    np.testing.assert_allclose(zca.whiten @ zca.unwhiten, np.eye(len(zca.mean)), atol=1e-8)


def test_zca_inverse_recovers_normalised_image_and_display_range():
    x = images(300)
    zca = pp.zca_fit(x)
    back = pp.zca_inverse(pp.zca_apply(x, zca), zca)
    np.testing.assert_allclose(back.reshape(len(x), -1), pp.normalize_images(x), atol=1e-5)
    shown = pp.to_display(back)
    assert shown.dtype == np.float32 and shown.shape == x.shape
    np.testing.assert_allclose(shown.reshape(len(x), -1).min(1), 0, atol=1e-7)
    np.testing.assert_allclose(shown.reshape(len(x), -1).max(1), 1, atol=1e-7)
    with pytest.raises(ValueError, match='do not match'):
        pp.zca_apply(np.zeros((2, 3, 3, 1)), zca)


@pytest.mark.parametrize('kind', pp.PREPROCESSOR_KINDS)
def test_preprocessor_apply_inverse_and_save(tmp_path, kind):
    x = images(200)
    p = pp.make_preprocessor(kind, x, zca_strength=0.05)
    z = p.apply(x)
    assert p.kind == kind and z.dtype == np.float32 and z.shape == x.shape
    shown = p.inverse(z)
    assert shown.min() >= 0 and shown.max() <= 1
    if kind not in pp.KIP_ZCA_KINDS:  # KIP's per-image step loses brightness and contrast
        np.testing.assert_allclose(shown, x, atol=1e-5)
    np.savez(tmp_path / 'run.npz', other=np.zeros(1), **p.to_dict())
    with np.load(tmp_path / 'run.npz') as saved:
        loaded = pp.Preprocessor.from_dict(saved)
    assert loaded.kind == kind
    np.testing.assert_array_equal(loaded.apply(x), z)
    if kind in pp.KIP_ZCA_KINDS + ('channel_zca',):
        assert loaded.zca.strength == 0.05 and loaded.zca.image_shape == (3, 3, 2)
        assert loaded.zca.per_image == (kind != 'channel_zca')


def test_unknown_preprocessor_names_choices():
    with pytest.raises(ValueError, match='none, standardize, kip_zca, channel_zca, zca'):
        pp.make_preprocessor('pca', images(10))


# The two ZCAs: KIP's (per-image step) and RCIG/FRePo's channel ZCA (standardisation, no per-image step).


def test_zca_alias_is_kip_zca_bitwise():
    x = images(300)
    old, new = pp.make_preprocessor('zca', x), pp.make_preprocessor('kip_zca', x)
    assert old.kind == 'zca' and new.kind == 'kip_zca' and pp.ALIASES['zca'] == 'kip_zca'
    np.testing.assert_array_equal(old.apply(x), new.apply(x))
    np.testing.assert_array_equal(old.apply(x), pp.zca_apply(x, pp.zca_fit(x)))


def test_channel_zca_whitens_the_standardised_train_split():
    x = images(1500)
    stats, zca = pp.channel_zca_fit(x, strength=0.1)
    np.testing.assert_array_equal(stats[0], pp.standardize_fit(x)[0])
    flat = pp.standardize_apply(x, stats).reshape(len(x), -1).astype(np.float64)
    second_moment = flat.T @ flat / len(flat)              # uncentred, as RCIG/FRePo compute it
    d = second_moment.shape[0]
    reg = 0.1 * np.trace(second_moment) / d
    eigvals, eigvecs = np.linalg.eigh(second_moment)
    z = pp.channel_zca_apply(x, stats, zca).reshape(len(x), -1).astype(np.float64)
    # Whitened second moment: U diag(s / (s + reg)) U^T, the regularised identity.
    expected = (eigvecs * (eigvals / (eigvals + reg))) @ eigvecs.T
    np.testing.assert_allclose(z.T @ z / len(z), expected, atol=2e-5)
    assert not zca.per_image and not zca.mean.any()
    # Nearly unregularised, the whitened split has identity second moment.
    tiny = pp.channel_zca_apply(x, *pp.channel_zca_fit(x, strength=1e-9)).reshape(len(x), -1)
    np.testing.assert_allclose(tiny.T.astype(np.float64) @ tiny / len(x), np.eye(d), atol=2e-3)


def test_per_image_step_only_in_kip_zca():
    x = images(400)
    # A brighter, higher-contrast copy of every image: KIP's ZCA normalises each image first, so
    # its output does not change; the channel ZCA has no per-image step and is affine in pixels.
    changed = x * np.linspace(0.5, 2.0, len(x))[:, None, None, None].astype(np.float32) + 0.2
    kip = pp.make_preprocessor('kip_zca', x)
    np.testing.assert_allclose(kip.apply(changed), kip.apply(x), atol=1e-4)
    channel = pp.make_preprocessor('channel_zca', x)
    assert np.abs(channel.apply(changed) - channel.apply(x)).max() > 0.1
    a, b = x[:5], x[5:10]
    affine = channel.apply(0.3 * a + 0.7 * b) - (0.3 * channel.apply(a) + 0.7 * channel.apply(b))
    np.testing.assert_allclose(affine, 0, atol=1e-4)


def test_channel_zca_on_grayscale_is_standardisation():
    x = images(200, shape=(4, 4, 1))
    p = pp.make_preprocessor('channel_zca', x)
    assert p.zca is None
    np.testing.assert_array_equal(p.apply(x), pp.make_preprocessor('standardize', x).apply(x))
    np.testing.assert_allclose(p.inverse(p.apply(x)), x, atol=1e-6)
    # KIP's ZCA on grayscale still whitens (unchanged behaviour).
    assert pp.make_preprocessor('kip_zca', x).zca is not None


def test_files_saved_before_the_channel_zca_load_as_kip_zca(tmp_path):
    x = images(100)
    p = pp.make_preprocessor('zca', x)
    arrays = p.to_dict()
    del arrays['preprocess_zca_per_image']                 # as older files were written
    loaded = pp.Preprocessor.from_dict(arrays)
    assert loaded.kind == 'zca' and loaded.zca.per_image
    np.testing.assert_array_equal(loaded.apply(x), p.apply(x))


def test_one_hot_centered():
    y = pp.one_hot_centered(np.array([0, 2, 1, 2]), 3)
    assert y.dtype == np.float32 and y.shape == (4, 3)
    np.testing.assert_allclose(y.sum(1), 0, atol=1e-6)
    np.testing.assert_allclose(y[1], [-1 / 3, -1 / 3, 2 / 3], rtol=1e-6)
    with pytest.raises(ValueError):
        pp.one_hot_centered(np.array([3]), 3)


def test_class_balanced_indices_exact_reproducible_and_errors():
    labels = np.array([0, 1, 2] * 10 + [1, 1])
    a = pp.class_balanced_indices(labels, 4, np.random.default_rng(7))
    b = pp.class_balanced_indices(labels, 4, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(labels[a], np.repeat([0, 1, 2], 4))  # class 0's first
    assert len(set(a.tolist())) == 12
    assert not np.array_equal(a, pp.class_balanced_indices(labels, 4, np.random.default_rng(8)))
    with pytest.raises(ValueError, match='class 0 has 10 examples'):
        pp.class_balanced_indices(labels, 11, np.random.default_rng(0))
    with pytest.raises(ValueError, match='class 3 has 0 examples'):
        pp.class_balanced_indices(labels, 1, np.random.default_rng(0), num_classes=4)


def test_class_balanced_batch_counts():
    labels = np.repeat(np.arange(10), 20)
    rng = np.random.default_rng(3)
    for batch_size in (10, 25, 37, 200):
        batch = pp.class_balanced_batch(labels, batch_size, rng)
        counts = np.bincount(labels[batch], minlength=10)
        assert len(batch) == batch_size and len(set(batch.tolist())) == batch_size
        assert counts.max() - counts.min() <= 1 and counts.min() == batch_size // 10
    np.testing.assert_array_equal(pp.class_balanced_batch(labels, 37, np.random.default_rng(1)),
                                  pp.class_balanced_batch(labels, 37, np.random.default_rng(1)))
    with pytest.raises(ValueError, match='fewer than the 21 batch_size=210'):
        pp.class_balanced_batch(labels, 210, rng)


def test_cli_offers_every_preprocessing_kind():
    from ntkdd.launch import cli
    assert set(cli.PREPROCESS_CHOICES) == {'auto', *pp.PREPROCESSOR_KINDS}
