"""The policy module on the synthetic dataset (plain torch optimizer, no trainer): loss falls,
LoRA starts equal to the base and merges back, noise draws are per sample, bad dims fail."""

import pytest
import torch
from loongforge.config import ConfigError
from loongforge_embodied.data.lerobot_v3 import LeRobotV3Dataset
from loongforge_embodied.data.samples import NoiseSource, PolicySamples, check_dims
from loongforge_embodied.data.synthetic import write_reaching_dataset
from loongforge_embodied.flow_matching import FlowMatching
from loongforge_embodied.lora import apply_lora, merged_state
from loongforge_embodied.pi05.config import tiny_config
from loongforge_embodied.pi05.model import PiModel
from loongforge_embodied.pi05.prompt import ByteTokenizer
from loongforge_embodied.policy import VLAPolicy, preprocess_images


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = write_reaching_dataset(tmp_path_factory.mktemp("reach"), episodes=2, length=8, image_size=16)
    pc = tiny_config("pi05", vocab_size=257)
    ds = LeRobotV3Dataset(root, chunk_size=pc.chunk_size)
    check_dims(ds, pc, str(root))
    return pc, ds, PolicySamples(ds, pc, ByteTokenizer(), max_length=64)


def batch(samples, idx):
    return torch.utils.data.default_collate([samples[i] for i in idx])


@pytest.mark.parametrize("mode", ["pi0", "pi05"])
def test_loss_falls(samples, mode):
    pc, ds, _ = samples
    pc = tiny_config(mode, vocab_size=257)
    s = PolicySamples(ds, pc, ByteTokenizer(), max_length=64)
    torch.manual_seed(0)
    pol = VLAPolicy(pc, None, ds.action_dim)
    b = batch(s, range(0, 16, 2))
    noise, t = NoiseSource(0, FlowMatching(), pc.chunk_size, pc.max_action_dim)(b["index"])
    args = [b[k] for k in ("images", "image_masks", "tokens", "token_masks", "state", "actions", "action_valid")]
    opt = torch.optim.AdamW(pol.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = pol(*args, noise, t).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    chunk = pol.sample(b["images"], b["image_masks"], b["tokens"], b["token_masks"], b["state"], steps=3,
                       generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (8, pc.chunk_size, ds.action_dim) and torch.isfinite(chunk).all()


def test_lora_starts_at_base_and_merges(samples):
    pc, _, s = samples
    torch.manual_seed(0)
    net = PiModel(pc).eval()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    b = batch(s, [0, 5])
    x = torch.randn(2, pc.chunk_size, pc.max_action_dim)
    t = torch.tensor([0.3, 0.7])
    pixels = preprocess_images(b["images"], pc.vision.image_size)
    want = net(pixels, b["image_masks"], b["tokens"], b["token_masks"], x, t)
    names = apply_lora(net, r"expert_layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.\w+_proj)", rank=4)
    assert len(names) == 2 * 7
    for n, p in net.named_parameters():
        p.requires_grad_("lora_" in n)
    assert torch.allclose(net(pixels, b["image_masks"], b["tokens"], b["token_masks"], x, t), want, atol=1e-6)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_b" in n:
                p.normal_()
    got = net(pixels, b["image_masks"], b["tokens"], b["token_masks"], x, t)
    merged = merged_state(net)
    assert merged.keys() == base.keys()
    plain = PiModel(pc).eval()
    plain.load_state_dict(merged)
    assert torch.allclose(plain(pixels, b["image_masks"], b["tokens"], b["token_masks"], x, t), got, atol=1e-5)
    assert not torch.allclose(got, want, atol=1e-3)


def test_noise_is_per_sample():
    a = NoiseSource(7, FlowMatching(), 4, 3)
    b = NoiseSource(7, FlowMatching(), 4, 3)
    n1, t1 = a([3, 5])
    n2, t2 = b([5])
    assert torch.equal(n1[1], n2[0]) and torch.equal(t1[1:], t2)
    n3, _ = a([3])                                   # the second visit of sample 3 draws anew
    assert not torch.equal(n3[0], n1[0])
    assert ((t1 > 0.001 - 1e-7) & (t1 <= 1.0)).all()


def test_state_wider_than_model_fails(samples):
    _, ds, _ = samples
    with pytest.raises(ConfigError, match=r"state has 2 dims, more than the model's 1 .*vla\.model\.max_state_dim"):
        check_dims(ds, tiny_config("pi05", max_state_dim=1), "reach")


@pytest.mark.parametrize("fmt", ["lerobot", "lerobot_policy", "ours"])
def test_pretrained_weights_load_through_the_mapping(fmt, tmp_path):
    from loongforge_embodied.task import VLATrainTask, mapping
    from safetensors.torch import save_file

    pc = tiny_config("pi05")
    src = PiModel(pc)
    sd = src.state_dict() if fmt == "ours" else mapping(fmt).to_theirs(src.state_dict())
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    dst = PiModel(pc)
    VLATrainTask.load_weights(dst, str(tmp_path / "w.safetensors"), fmt)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))
    with pytest.raises(ConfigError, match=r"vla\.pretrained.*does not fit vla\.model"):
        VLATrainTask.load_weights(PiModel(tiny_config("pi0")), str(tmp_path / "w.safetensors"), fmt)
