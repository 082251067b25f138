import pytest
import torch

from user_models import (ClusterUserModel, IndividualUserModel, UniformUserModel, build_user_model, load_user_model,
                         prepend_prefix)

D, T = 16, 3


def make(kind, n_users=5, use_text=False):
    torch.manual_seed(0)
    return build_user_model(kind, n_users, T, D, n_clusters=3, use_text=use_text, init=torch.randn(T, D),
                            init_std=0.1)


@pytest.mark.parametrize("kind", ["uniform", "individual", "cluster"])
def test_shapes_and_mask(kind):
    um = make(kind)
    out = um(torch.tensor([0, 1, 5]))
    assert out.embeds.shape == (3, T, D)
    assert out.mask.shape == (3, T) and out.mask.all()


@pytest.mark.parametrize("kind", ["uniform", "individual", "cluster"])
def test_index_zero_is_generic(kind):
    um = make(kind)
    generic = um(torch.tensor([0])).embeds[0]
    again = um(torch.tensor([0, 0])).embeds
    assert torch.equal(again[0], generic) and torch.equal(again[1], generic)
    if kind == "individual":
        assert torch.equal(generic, um.implicit.generic)
        with torch.no_grad():
            um.implicit.offsets.weight[2] += 1.0
        assert not torch.equal(um(torch.tensor([2])).embeds[0], generic)
        assert torch.equal(um(torch.tensor([0])).embeds[0], generic)  # o_0 stays zero
    if kind == "cluster":
        w = um.implicit.weights(torch.tensor([0]))
        assert torch.allclose(generic, torch.einsum("k,ktd->td", w[0], um.implicit.centres))
        assert torch.allclose(w.sum(-1), torch.ones(1))


def test_uniform_same_for_all():
    um = make("uniform")
    e = um(torch.tensor([0, 1, 4])).embeds
    assert torch.equal(e[0], e[1]) and torch.equal(e[1], e[2])


@pytest.mark.parametrize("kind", ["individual", "cluster"])
def test_gradients_reach_only_rows_used(kind):
    um = make(kind, n_users=6)
    um(torch.tensor([2, 4])).embeds.sum().backward()
    table = um.implicit.offsets if kind == "individual" else um.implicit.logits
    grad = table.weight.grad
    used = {2, 4}
    for row in range(grad.shape[0]):
        nonzero = bool(grad[row].abs().sum() > 0)
        assert nonzero == (row in used), f"row {row}"


def test_individual_generic_row_gets_no_gradient():
    um = make("individual")
    um(torch.tensor([0, 1])).embeds.sum().backward()
    assert um.implicit.offsets.weight.grad[0].abs().sum() == 0
    assert um.implicit.generic.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["uniform", "individual", "cluster"])
def test_save_load_round_trip(tmp_path, kind):
    um = make(kind)
    with torch.no_grad():
        for p in um.parameters():
            p.add_(torch.randn_like(p))
    um.save(tmp_path)
    assert (tmp_path / "user_model.safetensors").exists() and (tmp_path / "user_model.json").exists()
    back = load_user_model(tmp_path)
    idx = torch.tensor([0, 1, 3, 5])
    assert torch.equal(um(idx).embeds, back(idx).embeds)
    assert back.describe()["num_parameters"] == um.num_parameters()


def test_parameter_counts_small():
    um = make("cluster", n_users=1000)
    assert um.num_parameters() == 3 * T * D + 1001 * 3
    ind = make("individual", n_users=10)
    assert ind.num_parameters() == T * D + 11 * T * D


def test_explicit_text_concatenated():
    um = make("individual", use_text=True)
    emb = torch.nn.Embedding(50, D)
    text = torch.tensor([[5, 6, 7], [8, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    out = um(torch.tensor([1, 0]), text, mask, embed_tokens=emb)
    assert out.embeds.shape == (2, T + 3, D)
    assert out.mask.tolist() == [[1] * T + [1, 1, 1], [1] * T + [1, 0, 0]]
    assert torch.allclose(out.embeds[0, T:], emb(text[0]))


def test_bad_index_and_kind():
    um = make("individual", n_users=2)
    with pytest.raises(IndexError):
        um(torch.tensor([3]))
    with pytest.raises(ValueError, match="unknown user model kind"):
        build_user_model("nope", 2, T, D)
    with pytest.raises(ValueError, match="n_tokens"):
        build_user_model("individual", 2, 0, D)


def test_add_users_keeps_existing():
    um = make("individual", n_users=3)
    with torch.no_grad():
        um.implicit.offsets.weight[1:] += torch.randn(3, T * D)
    before = um(torch.tensor([0, 1, 2, 3])).embeds.clone()
    new = um.implicit.add_users(2)
    assert new == [4, 5] and um.n_users == 5
    assert torch.equal(um(torch.tensor([0, 1, 2, 3])).embeds, before)
    assert torch.equal(um(torch.tensor([4])).embeds[0], before[0])  # new users start generic


# ----------------------------------------------------------------------------------------------- prefix function

def test_prepend_prefix_right_padding():
    B, L = 2, 4
    tok = torch.randn(B, L, D)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, 5, 6, -100], [-100, 7, -100, -100]])
    prefix = torch.randn(B, T, D)
    out = prepend_prefix(prefix, torch.ones(B, T, dtype=torch.long), tok, mask, labels)
    assert out.inputs_embeds.shape == (B, T + L, D)
    assert out.attention_mask.tolist()[1] == [1] * T + [1, 1, 0, 0]
    assert out.labels[:, :T].eq(-100).all() and out.labels[0, T + 1] == 5
    assert out.position_ids[0].tolist()[: T + 3] == list(range(T + 3))


def test_prepend_prefix_left_padding_order():
    tok = torch.randn(1, 4, D)
    mask = torch.tensor([[0, 0, 1, 1]])
    prefix = torch.randn(1, T, D)
    out = prepend_prefix(prefix, torch.ones(1, T, dtype=torch.long), tok, mask, padding_side="left")
    # [pads, prefix, prompt]
    assert out.attention_mask.tolist()[0] == [0, 0] + [1] * (T + 2)
    assert torch.equal(out.inputs_embeds[0, 2:2 + T], prefix[0])
    assert torch.equal(out.inputs_embeds[0, 2 + T:], tok[0, 2:])
    assert out.position_ids[0, 2:].tolist() == list(range(T + 2))


def test_prepend_prefix_packs_padded_prefix():
    tok = torch.randn(1, 2, D)
    prefix = torch.randn(1, 3, D)
    pmask = torch.tensor([[1, 1, 0]])
    out = prepend_prefix(prefix, pmask, tok, torch.ones(1, 2, dtype=torch.long))
    assert out.attention_mask.tolist()[0] == [1, 1, 1, 1, 0]
    assert torch.equal(out.inputs_embeds[0, 2], tok[0, 0])


@pytest.mark.parametrize("kind", ["individual", "cluster"])
def test_shared_lr_zero_freezes_only_the_shared_parts(kind):
    """`user_model.shared_lr` sets e_0 (individual) or the centres (cluster) apart from the per-user rows."""
    from common.config import load_config
    from common.trainer import user_model_groups
    from user_models import build_user_model

    cfg = load_config(None, ["user_model.lr=0.1", "user_model.shared_lr=0"])
    torch.manual_seed(0)
    um = build_user_model(kind, n_users=3, n_tokens=2, dim=4, n_clusters=2)
    groups = user_model_groups([um], cfg)
    assert sorted(g["lr"] for g in groups) == [0.0, 0.1]
    shared_before = [p.detach().clone() for p in um.implicit.shared_parameters()]
    per_user_before = [p.detach().clone() for p in um.implicit.user_parameters(1)]
    opt = torch.optim.Adam(groups)
    target = torch.randn(3, 2, 4)
    for _ in range(3):
        opt.zero_grad()
        (um(torch.tensor([1, 2, 0])).embeds * target).sum().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(shared_before, um.implicit.shared_parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(per_user_before, um.implicit.user_parameters(1)))
    # without shared_lr every user-model parameter learns at user_model.lr; the per-user table in a group of its own
    # (the lazy optimizer moves only the batch's rows)
    groups = user_model_groups([um], load_config(None, ["user_model.lr=0.1"]))
    assert {g["lr"] for g in groups} == {0.1}
    assert sum(len(g["params"]) for g in groups) == len(list(um.parameters()))
    assert [g["params"] for g in groups if g.get("lazy")] == [um.user_tables()]


def test_spherical_kmeans_groups_rows_by_direction_not_length():
    from user_models.clustering import spherical_kmeans

    # two directions, each with a short and a long row: by position the long rows would pair up
    points = torch.tensor([[1.0, 0.0], [10.0, 0.5], [0.0, 1.0], [0.4, 12.0], [3.0, 0.2]])
    assert spherical_kmeans(points, 2).tolist() == [0, 0, 1, 1, 0]
    assert spherical_kmeans(points, 1).tolist() == [0] * 5
    assert spherical_kmeans(points, 5).tolist() == [0, 1, 2, 3, 4]  # labels in order of each cluster's first point


def test_spherical_kmeans_finds_noisy_groups_the_same_way_for_a_seed():
    from user_models.clustering import spherical_kmeans

    gen = torch.Generator().manual_seed(3)
    directions = torch.randn(3, 64, generator=gen)
    truth = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1, 0])
    rows = directions[truth] * torch.rand(10, 1, generator=gen).add(0.5) + 0.3 * torch.randn(10, 64, generator=gen)
    got = spherical_kmeans(rows, 3, seed=7)
    assert got.tolist() == [0, 1, 2, 2, 1, 0, 0, 1, 2, 1]  # the true groups, named by their first member
    assert torch.equal(got, spherical_kmeans(rows, 3, seed=7))
    with pytest.raises(ValueError, match="k must be"):
        spherical_kmeans(rows, 11)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        spherical_kmeans(rows[0], 2)
