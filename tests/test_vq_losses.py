"""VQ-GAN objective: GAN warm-up, correct non-saturating losses, LPIPS from local files only, eval-mode LPIPS."""
import pytest
import torch
import torch.nn.functional as F

from argen.errors import ArgenError
from argen.model.lpips import LIN_FILE, LPIPS, VGG16_FILE, save_random_weights
from argen.model.vq import VQ_SIZES, VQModel
from argen.model.vq_losses import (VQLoss, VQLossConfig, adaptive_weight, hinge_d_loss, hinge_g_loss,
                                   non_saturating_d_loss, non_saturating_g_loss, vanilla_d_loss)




def _batch(seed=0):
    torch.manual_seed(seed)
    model = VQModel(VQ_SIZES["VQ-micro"]).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    return model, x


def test_gan_term_is_zero_before_disc_start_and_active_after():
    model, x = _batch()
    loss = VQLoss(VQLossConfig(perceptual_weight=0.0, disc_start=3, disc_ndf=8, disc_layers=2))
    xr, q = model(x)
    before, logs = loss.generator_loss(x, xr, q, iteration=2)
    assert logs["loss_g_adv"] == 0.0 and logs["gan_weight"] == 0.0
    base = logs["loss_rec"] + logs["loss_vq"] + logs["loss_commit"]
    assert before.item() == pytest.approx(base, rel=1e-5)
    d_before, _ = loss.discriminator_loss(x, xr, iteration=2)
    assert d_before.item() == 0.0

    after, logs = loss.generator_loss(x, xr, q, iteration=3)
    g = -loss.discriminator(xr).mean()
    assert logs["gan_weight"] == 0.5 and logs["loss_g_adv"] == pytest.approx(g.item(), rel=1e-5)
    assert after.item() == pytest.approx(base + 0.5 * g.item(), rel=1e-5, abs=1e-6)
    after.backward()
    # the generator step trains the VQ only: no gradient is left in the discriminator
    assert all(p.grad is None for p in loss.discriminator.parameters())
    assert model.decoder.conv_out.weight.grad is not None
    d_after, dlogs = loss.discriminator_loss(x, xr, iteration=3)
    assert d_after.item() > 0 and "logits_real" in dlogs
    d_after.backward()
    assert all(p.grad is not None for p in loss.discriminator.parameters())


def test_adversarial_losses_have_the_textbook_form():
    real, fake = torch.tensor([3.0, -0.5, 2.0]), torch.tensor([-2.0, 0.3, -4.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean()).item())
    assert hinge_g_loss(fake).item() == pytest.approx(-fake.mean().item())
    # non-saturating: -log sigmoid(D(x̂)) for G; BCE with (logits, target) order for D
    assert non_saturating_g_loss(fake).item() == pytest.approx(F.softplus(-fake).mean().item(), rel=1e-6)
    assert non_saturating_d_loss(real, fake).item() == pytest.approx(vanilla_d_loss(real, fake).item(), rel=1e-6)
    confident = non_saturating_d_loss(torch.full((4,), 20.0), torch.full((4,), -20.0))
    assert confident.item() < 1e-6  # a perfect discriminator has ~zero loss (the swapped-argument bug does not)


def test_adaptive_weight_balances_gradients():
    torch.manual_seed(0)
    w = torch.randn(4, 4, requires_grad=True)
    nll = (w ** 2).sum()
    g = 10 * w.sum()
    a = adaptive_weight(nll, g, w)
    expected = (2 * w).norm() / ((10 * torch.ones(4, 4)).norm() + 1e-4)
    assert a.item() == pytest.approx(expected.item(), rel=1e-5) and not a.requires_grad
    model, x = _batch(1)
    loss = VQLoss(VQLossConfig(perceptual_weight=0.0, disc_start=0, disc_adaptive_weight=True, disc_ndf=8,
                               disc_layers=2))
    xr, q = model(x)
    total, logs = loss.generator_loss(x, xr, q, 1, last_layer=model.decoder.last_layer)
    assert logs["gan_weight"] != 0.5 and torch.isfinite(total)


def test_missing_lpips_weights_give_the_documented_error(tmp_path):
    with pytest.raises(ArgenError) as e:
        LPIPS.from_dir(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / VGG16_FILE) in msg and str(tmp_path / LIN_FILE) in msg
    assert "download.pytorch.org" in msg and "perceptual_weight=0" in msg
    with pytest.raises(ArgenError, match="lpips_dir"):
        VQLoss(VQLossConfig(perceptual_weight=1.0, lpips_dir=str(tmp_path / "nowhere")))
    with pytest.raises(ArgenError, match="lpips_dir is empty"):
        VQLoss(VQLossConfig(perceptual_weight=1.0, lpips_dir=""))


def test_lpips_from_local_files_is_deterministic_and_differentiable(tmp_path):
    save_random_weights(tmp_path)
    lp = LPIPS.from_dir(tmp_path)
    lp.train()  # must not switch the lin dropout on (the reference's bug)
    assert not lp.training and not any(p.requires_grad for p in lp.parameters())
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    d1, d2 = lp(x, y), lp(x, y)
    assert torch.equal(d1, d2) and d1.shape == (2,) and (d1 > 0).all()
    assert lp(x, x).abs().max().item() < 1e-6
    d1.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    # the loss module uses it with weight 1 by default
    loss = VQLoss(VQLossConfig(lpips_dir=str(tmp_path), disc_ndf=8, disc_layers=2))
    model = VQModel(VQ_SIZES["VQ-micro"]).train()
    xr, q = model(x[:, :, :16, :16])
    _, logs = loss.generator_loss(x[:, :, :16, :16], xr, q, 1)
    assert logs["loss_lpips"] > 0
    (tmp_path / LIN_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ArgenError, match="cannot read"):
        LPIPS.from_dir(tmp_path)
