"""Unit tests of loongforge.weight_mapping (no megatron-core needed)."""

from __future__ import annotations

import pytest
import torch
from loongforge.weight_mapping import (
    FusedGateUp,
    FusedQKV,
    MappingError,
    Rename,
    TiedOutput,
    VocabRows,
    WeightMapping,
    load_into,
    safetensors_getter,
)

H, NH, NG, D, FFN, V, VP, L = 8, 4, 2, 3, 10, 11, 16, 3


def qkv_rule(kind="weight", nh=NH, ng=NG):
    return FusedQKV(
        hf_q=f"l.{{i}}.q.{kind}", hf_k=f"l.{{i}}.k.{kind}", hf_v=f"l.{{i}}.v.{kind}",
        ours=f"d.{{i}}.qkv.{kind}", num_heads=nh, num_query_groups=ng, head_dim=D,
    )


def rules(tied=False):
    out = [
        VocabRows(hf="emb", ours="embedding.word_embeddings.weight", vocab_size=V, padded_vocab_size=VP),
        Rename(hf="l.{i}.norm", ours="d.{i}.input_layernorm.weight"),
        qkv_rule("weight"),
        qkv_rule("bias"),
        Rename(hf="l.{i}.o", ours="d.{i}.proj.weight", tp_dim=1),
        FusedGateUp(hf_gate="l.{i}.gate", hf_up="l.{i}.up", ours="d.{i}.fc1.weight"),
        Rename(hf="l.{i}.down", ours="d.{i}.fc2.weight", tp_dim=1),
        Rename(hf="final_norm", ours="decoder.final_layernorm.weight", stage="head"),
    ]
    if tied:
        out.append(TiedOutput(hf="emb", ours="output_layer.weight", vocab_size=V, padded_vocab_size=VP))
    else:
        out.append(VocabRows(hf="head", ours="output_layer.weight", stage="head", vocab_size=V, padded_vocab_size=VP))
    return out


def hf_state(tied=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    sd = {"emb": r(V, H), "final_norm": r(H)}
    if not tied:
        sd["head"] = r(V, H)
    for i in range(L):
        sd |= {
            f"l.{i}.norm": r(H), f"l.{i}.q.weight": r(NH * D, H), f"l.{i}.k.weight": r(NG * D, H),
            f"l.{i}.v.weight": r(NG * D, H), f"l.{i}.q.bias": r(NH * D), f"l.{i}.k.bias": r(NG * D),
            f"l.{i}.v.bias": r(NG * D), f"l.{i}.o": r(H, NH * D), f"l.{i}.gate": r(FFN, H),
            f"l.{i}.up": r(FFN, H), f"l.{i}.down": r(H, FFN),
        }
    return sd


def test_qkv_layout_is_megatron_gqa_interleave():
    q = torch.arange(NH * D).float()[:, None].expand(-1, 2)  # rows named by value
    k = 100 + torch.arange(NG * D).float()[:, None].expand(-1, 2)
    v = 200 + torch.arange(NG * D).float()[:, None].expand(-1, 2)
    fused = qkv_rule().combine({"l.{i}.q.weight": q, "l.{i}.k.weight": k, "l.{i}.v.weight": v}, "x")
    hpg = NH // NG
    expected = []
    for grp in range(NG):  # per group: its query heads, then its key head, then its value head
        expected.append(q[grp * hpg * D:(grp + 1) * hpg * D])
        expected.append(k[grp * D:(grp + 1) * D])
        expected.append(v[grp * D:(grp + 1) * D])
    assert torch.equal(fused, torch.cat(expected))


@pytest.mark.parametrize("nh,ng", [(4, 2), (4, 1), (4, 4), (8, 2)])
def test_qkv_round_trip_gqa(nh, ng):
    rule = qkv_rule(nh=nh, ng=ng)
    hf = {"l.{i}.q.weight": torch.randn(nh * D, H), "l.{i}.k.weight": torch.randn(ng * D, H), "l.{i}.v.weight": torch.randn(ng * D, H)}
    back = rule.split(rule.combine(hf, "x"), "x")
    assert all(torch.equal(back[n], hf[n]) for n in hf)
    bias = qkv_rule("bias", nh=nh, ng=ng)
    hfb = {"l.{i}.q.bias": torch.randn(nh * D), "l.{i}.k.bias": torch.randn(ng * D), "l.{i}.v.bias": torch.randn(ng * D)}
    backb = bias.split(bias.combine(hfb, "x"), "x")
    assert all(torch.equal(backb[n], hfb[n]) for n in hfb)


@pytest.mark.parametrize("tp", [1, 2])
def test_tp_split_then_merge_equals_full(tp):
    m = WeightMapping(rules(), L)
    sd = hf_state()
    full = m.hf_to_ours(sd.__getitem__)
    shards = [m.hf_to_ours(sd.__getitem__, r, tp) for r in range(tp)]
    for name, t in full.items():
        assert torch.equal(m.merge_tp(name, [s[name] for s in shards]), t), name
        for r in range(tp):
            assert torch.equal(m.shard(name, t, r, tp), shards[r][name]), name


def test_tp_shard_contents():
    m = WeightMapping(rules(), L)
    sd = hf_state()
    r0, r1 = (m.hf_to_ours(sd.__getitem__, r, 2) for r in range(2))
    # QKV: each rank owns whole query groups = a contiguous half of the fused rows
    full = m.hf_to_ours(sd.__getitem__)
    assert torch.equal(r1["d.1.qkv.weight"], full["d.1.qkv.weight"].chunk(2)[1])
    assert torch.equal(r0["d.1.qkv.weight"][: (NH // NG) * D], sd["l.1.q.weight"][: (NH // NG) * D])
    # fc1: [gate_r; up_r] on every rank, not a plain chunk of [gate; up]
    assert torch.equal(r1["d.0.fc1.weight"], torch.cat([sd["l.0.gate"][5:], sd["l.0.up"][5:]]))
    # row parallel on dim 1, replicated norms
    assert torch.equal(r1["d.2.proj.weight"], sd["l.2.o"][:, NH * D // 2:])
    assert torch.equal(r1["d.2.input_layernorm.weight"], sd["l.2.norm"])
    # vocab: padded rows, split by rows
    assert r0["embedding.word_embeddings.weight"].shape == (VP // 2, H)


def test_vocab_pad_and_strip():
    m = WeightMapping(rules(), L)
    sd = hf_state()
    ours = m.hf_to_ours(sd.__getitem__)
    emb = ours["embedding.word_embeddings.weight"]
    assert emb.shape == (VP, H)
    assert torch.equal(emb[:V], sd["emb"]) and not emb[V:].any()
    assert torch.equal(ours["output_layer.weight"][:V], sd["head"])
    back = m.ours_to_hf(ours.__getitem__)
    assert back["emb"].shape == (V, H) and back["head"].shape == (V, H)


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_bit_identical(tied):
    m = WeightMapping(rules(tied), L)
    sd = hf_state(tied)
    back = m.ours_to_hf(m.hf_to_ours(sd.__getitem__).__getitem__)
    assert set(back) == set(sd)
    assert all(torch.equal(back[n], sd[n]) for n in sd)
    assert set(m.hf_names()) == set(sd)


def test_pipeline_stage_selection_and_local_numbering():
    m = WeightMapping(rules(tied=True), L)
    sd = hf_state(tied=True)
    first = m.hf_to_ours(sd.__getitem__, layers=[0, 1], post_process=False)
    assert "embedding.word_embeddings.weight" in first and "output_layer.weight" not in first
    assert "decoder.final_layernorm.weight" not in first and "d.2.fc1.weight" not in first
    last = m.hf_to_ours(sd.__getitem__, layer_offset=2, pre_process=False)
    assert set(k.split(".")[1] for k in last if k.startswith("d.")) == {"0"}  # layer 2 is local 0
    assert torch.equal(last["d.0.fc2.weight"], sd["l.2.down"])
    # tied: a last stage without the embedding gets the output layer from the HF embedding
    assert torch.equal(last["output_layer.weight"][:V], sd["emb"])
    assert "embedding.word_embeddings.weight" not in last
    # pp=1 tied: megatron has no separate output weight
    assert "output_layer.weight" not in m.hf_to_ours(sd.__getitem__)
    assert m.hf_names(layers=[2], pre_process=False) == ["l.2.norm", "l.2.q.weight", "l.2.k.weight", "l.2.v.weight",
                                                          "l.2.q.bias", "l.2.k.bias", "l.2.v.bias", "l.2.o",
                                                          "l.2.gate", "l.2.up", "l.2.down", "final_norm", "emb"]
    assert m.ours_names(layers=[2], pre_process=False)[0] == "d.0.input_layernorm.weight"
    with pytest.raises(MappingError, match="outside"):
        m.hf_to_ours(sd.__getitem__, layers=[3])


def test_errors_name_parameter_and_shapes():
    m = WeightMapping(rules(), L)
    sd = hf_state()
    bad = dict(sd, **{"l.1.k.weight": torch.randn(NG * D + 1, H)})
    with pytest.raises(MappingError, match=r"d\.1\.qkv\.weight.*'l\.1\.k\.weight'.*expected shape \(6, 8\), got \(7, 8\)"):
        m.hf_to_ours(bad.__getitem__)
    with pytest.raises(MappingError, match=r"embedding\.word_embeddings\.weight.*expected 11 vocabulary rows.*\(12, 8\)"):
        m.hf_to_ours(dict(sd, emb=torch.randn(V + 1, H)).__getitem__)
    with pytest.raises(MappingError, match=r"d\.0\.fc1\.weight.*'l\.0\.gate' has shape \(10, 8\) but 'l\.0\.up' has \(12, 8\)"):
        m.hf_to_ours(dict(sd, **{"l.0.up": torch.randn(FFN + 2, H)}).__getitem__)
    with pytest.raises(MappingError, match=r"d\.0\.qkv\.weight.*num_query_groups.*not divisible.*3"):
        m.hf_to_ours(sd.__getitem__, 0, 3, pre_process=False, post_process=False)
    with pytest.raises(MappingError, match=r"embedding\.word_embeddings\.weight.*\(16, 8\).*not divisible by the tensor-parallel size 3"):
        m.hf_to_ours(sd.__getitem__, 0, 3)
    with pytest.raises(KeyError, match="nope"):
        m.rule_for("nope.weight")


def test_te_spec_names():
    m = WeightMapping(
        [Rename(hf="l.{i}.n", ours="decoder.layers.{i}.input_layernorm.weight"),
         Rename(hf="l.{i}.m", ours="decoder.layers.{i}.pre_mlp_layernorm.weight")], 1)
    te = m.for_te_spec()
    assert [r.ours for r in te.rules] == ["decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
                                          "decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight"]
    assert m.matching(["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"]).rules == te.rules
    assert m.matching(["decoder.layers.0.input_layernorm.weight"]) is m
    assert te.rule_for("decoder.layers.0.mlp.linear_fc1.layer_norm_weight")[1] == 0


def test_load_into_checks_shapes_and_coverage():
    mod = torch.nn.Linear(3, 2)
    load_into(mod, {"weight": torch.ones(2, 3, dtype=torch.float64), "bias": torch.zeros(2)})
    assert mod.weight.dtype == torch.float32 and bool((mod.weight == 1).all())
    with pytest.raises(MappingError, match=r"'weight': expected shape \(2, 3\), got \(3, 2\)"):
        load_into(mod, {"weight": torch.ones(3, 2), "bias": torch.zeros(2)})
    with pytest.raises(MappingError, match="no tensor for parameters.*bias"):
        load_into(mod, {"weight": torch.ones(2, 3)})
    with pytest.raises(MappingError, match="does not have.*extra"):
        load_into(mod, {"extra": torch.ones(1)})


def test_safetensors_getter(tmp_path):
    from safetensors.torch import save_file

    sd = hf_state()
    save_file(sd, str(tmp_path / "model.safetensors"))
    get = safetensors_getter(tmp_path)
    m = WeightMapping(rules(), L)
    assert torch.equal(m.hf_to_ours(get)["d.0.fc2.weight"], sd["l.0.down"])
    with pytest.raises(KeyError, match="missing"):
        get("missing")
    assert m.unmapped_hf(list(sd) + ["mtp.0.w", "other"]) == ["mtp.0.w", "other"]
    assert WeightMapping(rules(), L, ignore_hf=[r"mtp\..*"]).unmapped_hf(["mtp.0.w"]) == []


@pytest.mark.parametrize("tied", [False, True])
def test_tp_ranks_read_only_their_slices(tmp_path, tied):
    """From safetensors, each TP rank's tensors equal shard(combine(full)) while it reads only
    its share of the sharded tensors from the file (replicated norms are read whole)."""
    from safetensors.torch import save_file

    sd = hf_state(tied)
    save_file(sd, tmp_path / "model.safetensors")
    m = WeightMapping(rules(tied), L)
    get = safetensors_getter(tmp_path)
    read = []

    def counting_slice(name):
        lazy = get.slice(name)

        class Counted:
            def get_shape(self):
                return lazy.get_shape()

            def __getitem__(self, index):
                t = lazy[index]
                read.append(t.numel())
                return t

        return Counted()

    def counting(name):
        raise AssertionError(f"{name} read whole")

    counting.slice = counting_slice
    total = sum(t.numel() for t in sd.values())
    replicated = sum(t.numel() for n, t in sd.items() if "norm" in n)
    per_rank = []
    for rank in range(2):
        read.clear()
        sliced = m.hf_to_ours(counting, rank, 2)
        full = m.hf_to_ours(lambda n: sd[n], rank, 2)
        assert sliced.keys() == full.keys()
        assert all(torch.equal(sliced[k], full[k]) for k in full)
        per_rank.append(sum(read))
    print(f"elements read per TP rank: {per_rank} of {total} ({replicated} replicated norms)")
    assert sum(per_rank) == total + replicated  # every sharded element read by exactly one rank


@pytest.mark.parametrize("rank", range(4))
def test_vocab_rows_read_with_padding_per_rank(tmp_path, rank):
    from safetensors.torch import save_file

    emb = torch.randn(V, H)
    save_file({"emb": emb}, tmp_path / "e.safetensors")
    rule = VocabRows(hf="emb", ours="e", vocab_size=V, padded_vocab_size=VP)
    lazy = {"emb": safetensors_getter(tmp_path / "e.safetensors").slice("emb")}
    assert torch.equal(rule.read_shard(lazy, rank, 4, "e"), rule.shard(rule.combine({"emb": emb}, "e"), rank, 4, "e"))


def test_sliced_read_checks_shapes_first(tmp_path):
    from safetensors.torch import save_file

    save_file({"emb": torch.randn(V + 1, H)}, tmp_path / "e.safetensors")
    rule = VocabRows(hf="emb", ours="e", vocab_size=V, padded_vocab_size=VP)
    lazy = {"emb": safetensors_getter(tmp_path / "e.safetensors").slice("emb")}
    with pytest.raises(MappingError, match="expected 11 vocabulary rows"):
        rule.read_shard(lazy, 0, 2, "e")
