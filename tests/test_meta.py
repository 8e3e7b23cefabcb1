"""Tests of mrec_utils.meta against finite differences, plain autograd loops and hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrec_utils import meta as M
from mrec_utils import train
from mrec_utils.tasks import TaskBatch

DT = torch.float64
LR = 0.1
STEPS = 2


# ------------------------------------------------------------------------------------------
# Fixtures and independent references (plain torch.autograd, boolean indexing, no masks)
# ------------------------------------------------------------------------------------------


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)


def make_tasks(sizes_s, sizes_q, seed: int = 1):
    """A list of tasks with different true sizes: (xs [n_s,3], ys [n_s], xq [n_q,3], yq [n_q])."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for ns, nq in zip(sizes_s, sizes_q):
        w = torch.randn(3, generator=g, dtype=DT)
        xs, xq = torch.randn(ns, 3, generator=g, dtype=DT), torch.randn(nq, 3, generator=g, dtype=DT)
        tasks.append((xs, torch.sin(xs @ w), xq, torch.sin(xq @ w)))
    return tasks


def pad_tasks(tasks, S=None, Q=None, garbage=0.0, extra_empty_tasks=0):
    """Pad a task list into a TaskBatch; padded rows hold ``garbage``."""
    S = S or max(t[0].shape[0] for t in tasks)
    Q = Q or max(t[2].shape[0] for t in tasks)
    T = len(tasks) + extra_empty_tasks
    b = {
        "x_support": torch.full((T, S, 3), garbage, dtype=DT),
        "y_support": torch.full((T, S), garbage, dtype=DT),
        "mask_support": torch.zeros(T, S, dtype=torch.bool),
        "x_query": torch.full((T, Q, 3), garbage, dtype=DT),
        "y_query": torch.full((T, Q), garbage, dtype=DT),
        "mask_query": torch.zeros(T, Q, dtype=torch.bool),
    }
    for i, (xs, ys, xq, yq) in enumerate(tasks):
        b["x_support"][i, : len(ys)] = xs
        b["y_support"][i, : len(ys)] = ys
        b["mask_support"][i, : len(ys)] = True
        b["x_query"][i, : len(yq)] = xq
        b["y_query"][i, : len(yq)] = yq
        b["mask_query"][i, : len(yq)] = True
    return TaskBatch(**b)


def ref_loss(model, params, x, y):
    pred = torch.func.functional_call(model, params, (x,)).squeeze(-1)
    return ((pred - y) ** 2).mean()


def ref_adapt(model, params, x, y, steps, lr, create_graph):
    """Plain SGD with torch.autograd.grad (create_graph = second order)."""
    names = list(params)
    for _ in range(steps):
        loss = ref_loss(model, params, x, y)
        gs = torch.autograd.grad(loss, [params[n] for n in names], create_graph=create_graph)
        params = {n: params[n] - lr * (g if create_graph else g.detach()) for n, g in zip(names, gs)}
    return params


def ref_maml_loss(model, tasks, steps, lr, create_graph=True):
    params = dict(model.named_parameters())
    losses = [ref_loss(model, ref_adapt(model, params, xs, ys, steps, lr, create_graph), xq, yq) for xs, ys, xq, yq in tasks]
    return torch.stack(losses).mean()


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


KW = dict(loss_fn=M.mse_loss_per_example, steps=STEPS, inner_lr=LR)

SIZES_S, SIZES_Q = [5, 3, 7], [4, 6, 2]


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: extra BLAS threads only add waiting when other programs share the
    cores (it made the finite-difference test 5x slower). Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def setup():
    model = make_mlp()
    params, frozen = M.split_params(model)
    tasks = make_tasks(SIZES_S, SIZES_Q)
    return model, params, frozen, tasks, pad_tasks(tasks)


def finite_difference_grad(f, tensors: dict, h: float = 1e-6) -> dict:
    """Central differences of the scalar function f() w.r.t. every entry of every tensor."""
    out = {}
    with torch.no_grad():  # torch.func.grad inside f ignores the outer no_grad
        for name, t in tensors.items():
            g = torch.zeros_like(t)
            flat_t, flat_g = t.view(-1), g.view(-1)
            for i in range(flat_t.numel()):
                old = flat_t[i].item()
                flat_t[i] = old + h
                fp = f().item()
                flat_t[i] = old - h
                fm = f().item()
                flat_t[i] = old
                flat_g[i] = (fp - fm) / (2 * h)
            out[name] = g
    return out


# ------------------------------------------------------------------------------------------
# MAML / FOMAML
# ------------------------------------------------------------------------------------------


def test_second_order_meta_gradient_matches_finite_differences(setup):
    model, params, frozen, _, batch = setup
    _, g = M.meta_gradient(model, params, frozen, batch, **KW)
    fd = finite_difference_grad(lambda: M.maml_loss(model, params, frozen, batch, **KW), params)
    assert rel_err(flat(g), flat(fd)) < 1e-5
    # the check is sharp enough to tell first order from second order
    _, g_fo = M.meta_gradient(model, params, frozen, batch, first_order=True, **KW)
    assert rel_err(flat(g_fo), flat(fd)) > 1e-3


def test_maml_matches_create_graph_reference(setup):
    model, params, frozen, tasks, batch = setup
    loss, g = M.meta_gradient(model, params, frozen, batch, **KW)
    ref = ref_maml_loss(model, tasks, STEPS, LR, create_graph=True)
    g_ref = torch.autograd.grad(ref, list(params.values()))
    assert torch.allclose(loss, ref.detach(), rtol=1e-12, atol=1e-14)
    for a, b in zip(g.values(), g_ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_fomaml_is_query_gradient_at_adapted_params(setup):
    model, params, frozen, tasks, batch = setup
    _, g = M.meta_gradient(model, params, frozen, batch, first_order=True, **KW)
    ref = {n: torch.zeros_like(p) for n, p in params.items()}
    for xs, ys, xq, yq in tasks:
        adapted = ref_adapt(model, dict(params), xs, ys, STEPS, LR, create_graph=False)
        leaf = {n: p.detach().requires_grad_(True) for n, p in adapted.items()}
        gq = torch.autograd.grad(ref_loss(model, leaf, xq, yq), list(leaf.values()))
        for n, gi in zip(leaf, gq):
            ref[n] += gi / len(tasks)
    for n in params:
        assert torch.allclose(g[n], ref[n], rtol=1e-10, atol=1e-13)


def test_zero_inner_steps_is_plain_query_gradient(setup):
    model, params, frozen, tasks, batch = setup
    for first_order in (False, True):
        loss, g = M.meta_gradient(model, params, frozen, batch, loss_fn=M.mse_loss_per_example, steps=0, inner_lr=LR, first_order=first_order)
        ref = torch.stack([((model(xq).squeeze(-1) - yq) ** 2).mean() for _, _, xq, yq in tasks]).mean()
        g_ref = torch.autograd.grad(ref, list(params.values()))
        assert torch.allclose(loss, ref.detach(), rtol=1e-12)
        for a, b in zip(g.values(), g_ref):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("adapt", ["all", "head"])
def test_vmap_equals_loop_with_padded_tasks_of_different_sizes(setup, first_order, adapt):
    model, _, _, _, batch = setup
    params, frozen = M.split_params(model, adapt=adapt)
    wrt = {**params, **frozen}
    kw = dict(KW, first_order=first_order)
    l_v, g_v = M.meta_gradient(model, params, frozen, batch, wrt=wrt, **kw)
    l_l, g_l = M.meta_gradient(model, params, frozen, batch, wrt=wrt, vectorize=False, **kw)
    assert torch.allclose(l_v, l_l, rtol=1e-12, atol=1e-14)
    for n in wrt:
        assert torch.allclose(g_v[n], g_l[n], rtol=1e-10, atol=1e-13), n


def test_padding_never_changes_results(setup):
    model, params, frozen, tasks, batch = setup
    wide = pad_tasks(tasks, S=11, Q=9, garbage=1e6)
    nan_padded = pad_tasks(tasks, S=9, Q=8, garbage=float("nan"), extra_empty_tasks=2)
    l0, g0 = M.meta_gradient(model, params, frozen, batch, **KW)
    for b in (wide, nan_padded):
        for vectorize in (True, False):
            l1, g1 = M.meta_gradient(model, params, frozen, b, vectorize=vectorize, **KW)
            assert torch.allclose(l0, l1, rtol=1e-13, atol=0)
            for n in g0:
                assert torch.allclose(g0[n], g1[n], rtol=1e-11, atol=1e-15), n
    new0 = M.reptile_step(model, params, frozen, batch, epsilon=0.5, **KW)
    new1 = M.reptile_step(model, params, frozen, nan_padded, epsilon=0.5, **KW)
    for n in new0:
        assert torch.allclose(new0[n], new1[n], rtol=1e-12, atol=1e-15)


def test_garbage_in_padding_would_matter_without_mask(setup):
    """Guard that the padding test is meaningful: unmasked garbage rows do change the loss."""
    model, params, frozen, tasks, batch = setup
    wide = pad_tasks(tasks, S=11, Q=9, garbage=3.0)
    unmasked = TaskBatch(wide.x_support, wide.y_support, wide.x_query, wide.y_query)
    assert not torch.allclose(M.maml_loss(model, params, frozen, batch, **KW), M.maml_loss(model, params, frozen, unmasked, **KW))


def test_empty_tasks_give_zero_loss_and_finite_grads(setup):
    model, params, frozen, tasks, _ = setup
    b = pad_tasks(tasks[:1], extra_empty_tasks=1)
    b.mask_support[0] = False  # task 0: no support -> no adaptation; task 1: nothing at all
    loss, g = M.meta_gradient(model, params, frozen, b, **KW)
    xq, yq = tasks[0][2], tasks[0][3]
    assert torch.allclose(loss, ((model(xq).squeeze(-1) - yq) ** 2).mean().detach())
    assert all(torch.isfinite(v).all() for v in g.values())
    only_empty = pad_tasks(tasks[:1])
    only_empty.mask_support[:] = False
    only_empty.mask_query[:] = False
    loss, g = M.meta_gradient(model, params, frozen, only_empty, **KW)
    assert loss.item() == 0.0 and all((v == 0).all() for v in g.values())
    assert M.masked_mean(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0])).item() == 0.0


def test_meta_step_updates_parameters_with_the_meta_gradient(setup):
    model, params, frozen, _, batch = setup
    before = {n: p.detach().clone() for n, p in params.items()}
    _, g = M.meta_gradient(model, params, frozen, batch, **KW)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    M.meta_step(model, params, frozen, batch, opt, **KW)
    for n, p in params.items():
        assert torch.allclose(p.detach(), before[n] - 0.5 * g[n], rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------
# ANIL and Meta-SGD
# ------------------------------------------------------------------------------------------


def test_split_params_head_is_last_linear_and_prefixes():
    model = make_mlp()
    head, body = M.split_params(model, adapt="head")
    assert list(head) == ["4.weight", "4.bias"]
    assert list(body) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert head["4.weight"] is model[4].weight  # the module's own parameters, not copies
    a, _ = M.split_params(model, adapt=["2"])
    assert list(a) == ["2.weight", "2.bias"]
    a, _ = M.split_params(model, adapt=lambda n: n.endswith("bias"))
    assert list(a) == ["0.bias", "2.bias", "4.bias"]


def test_anil_adapts_only_the_head(setup):
    model, _, _, tasks, batch = setup
    head, body = M.split_params(model, adapt="head")
    body_before = {n: p.detach().clone() for n, p in body.items()}
    xs, ys = tasks[0][0], tasks[0][1]
    adapted = M.inner_adapt(model, head, body, xs, ys, loss_fn=M.mse_loss_per_example, steps=3, inner_lr=LR)
    assert set(adapted) == set(head)
    for n in head:
        assert not torch.allclose(adapted[n], head[n])
    for n, p in body.items():
        assert torch.equal(p.detach(), body_before[n])
    # ANIL = MAML over all parameters with inner learning rate 0 on the body (Meta-SGD lrs),
    # including the meta-gradient of the body (it flows through the adapted head)
    params_all, _ = M.split_params(model, adapt="all")
    lrs = {n: torch.full_like(p, 0.0 if n in body else LR) for n, p in params_all.items()}
    l_anil, g_anil = M.meta_gradient(model, head, body, batch, wrt=params_all, **KW)
    l_ref, g_ref = M.meta_gradient(model, params_all, {}, batch, wrt=params_all, loss_fn=M.mse_loss_per_example, steps=STEPS, inner_lr=lrs)
    assert torch.allclose(l_anil, l_ref, rtol=1e-12)
    for n in params_all:
        assert torch.allclose(g_anil[n], g_ref[n], rtol=1e-10, atol=1e-13), n
    assert flat({n: g_anil[n] for n in body}).abs().max() > 1e-4  # the body is meta-learned
    some_body = {n: body[n] for n in ("0.bias", "2.bias")}
    fd = finite_difference_grad(lambda: M.maml_loss(model, head, body, batch, **KW), some_body)
    assert rel_err(flat({n: g_anil[n] for n in some_body}), flat(fd)) < 1e-5


def test_meta_sgd_equal_lrs_is_maml_and_lr_gradient_matches_fd(setup):
    model, params, frozen, _, batch = setup
    lrs = M.init_meta_sgd_lrs(params, init=LR)
    assert all(l.requires_grad and l.shape == params[n].shape for n, l in lrs.items())
    kw = dict(loss_fn=M.mse_loss_per_example, steps=STEPS)
    l_sgd, g_sgd = M.meta_gradient(model, params, frozen, batch, inner_lr=lrs, **kw)
    l_maml, g_maml = M.meta_gradient(model, params, frozen, batch, inner_lr=LR, **kw)
    assert torch.allclose(l_sgd, l_maml, rtol=1e-14)
    for n in params:
        assert torch.allclose(g_sgd[n], g_maml[n], rtol=1e-12, atol=1e-15)
    scalar = {n: torch.tensor(LR, dtype=DT) for n in params}  # one rate per tensor (0-dim) also works
    assert torch.allclose(M.maml_loss(model, params, frozen, batch, inner_lr=scalar, **kw), l_maml, rtol=1e-14)
    with torch.no_grad():  # make the rates different from each other
        for l in lrs.values():
            l.uniform_(0.05, 0.15)
    _, g_lr = M.meta_gradient(model, params, frozen, batch, inner_lr=lrs, wrt=lrs, **kw)
    some = {n: lrs[n] for n in ("0.bias", "2.bias", "4.weight", "4.bias")}  # one entry per layer path, keeps it fast
    fd = finite_difference_grad(lambda: M.maml_loss(model, params, frozen, batch, inner_lr=lrs, **kw), some)
    assert rel_err(flat({n: g_lr[n] for n in some}), flat(fd)) < 1e-5
    assert all(g.abs().max() > 0 for g in g_lr.values())


# ------------------------------------------------------------------------------------------
# Reptile
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_query", [True, False])
def test_reptile_equals_hand_formula(setup, use_query):
    model, params, frozen, tasks, batch = setup
    eps = 0.3
    new = M.reptile_step(model, params, frozen, batch, loss_fn=M.mse_loss_per_example, steps=3, inner_lr=LR, epsilon=eps, use_query=use_query)
    phi = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
    diffs = {n: torch.zeros_like(p) for n, p in phi.items()}
    for xs, ys, xq, yq in tasks:
        x, y = (torch.cat([xs, xq]), torch.cat([ys, yq])) if use_query else (xs, ys)
        phi_i = ref_adapt(model, phi, x, y, 3, LR, create_graph=False)
        for n in phi:
            diffs[n] += (phi_i[n] - phi[n]).detach() / len(tasks)
    for n in phi:
        expected = phi[n].detach() + eps * diffs[n]
        assert torch.allclose(new[n], expected, rtol=1e-12, atol=1e-15)
        assert not torch.allclose(new[n], phi[n].detach())
    # serial Reptile = a meta-batch of one task
    one = pad_tasks(tasks[:1])
    new1 = M.reptile_step(model, params, frozen, one, loss_fn=M.mse_loss_per_example, steps=3, inner_lr=LR, epsilon=1.0, use_query=use_query)
    xs, ys, xq, yq = tasks[0]
    x, y = (torch.cat([xs, xq]), torch.cat([ys, yq])) if use_query else (xs, ys)
    phi_1 = ref_adapt(model, phi, x, y, 3, LR, create_graph=False)
    for n in phi:
        assert torch.allclose(new1[n], phi_1[n].detach(), rtol=1e-12, atol=1e-15)


def test_load_params_writes_into_model(setup):
    model, params, frozen, _, batch = setup
    new = M.reptile_step(model, params, frozen, batch, epsilon=1.0, **KW)
    M.load_params_(model, new)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), new[n])


# ------------------------------------------------------------------------------------------
# The meta-training loop: equal to the plain loops it replaces, early stopping, kept state
# ------------------------------------------------------------------------------------------


def sampler(seed: int = 3, T: int = 4):
    """sample(step) -> a padded TaskBatch of T tasks of random sizes; the generator is the caller's."""
    g = torch.Generator().manual_seed(seed)

    def sample(step):
        sizes = torch.randint(2, 6, (2, T), generator=g).tolist()
        tasks = []
        for ns, nq in zip(*sizes):
            w = torch.randn(3, generator=g, dtype=DT)
            xs, xq = torch.randn(ns, 3, generator=g, dtype=DT), torch.randn(nq, 3, generator=g, dtype=DT)
            tasks.append((xs, torch.sin(xs @ w), xq, torch.sin(xq @ w)))
        return pad_tasks(tasks)

    return sample


def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("first_order, adapt", [(False, "all"), (True, "all"), (False, "head")])
def test_meta_train_maml_fomaml_anil_equal_the_plain_loop(first_order, adapt):
    n = 6
    ref = make_mlp()
    params, frozen = M.split_params(ref, adapt=adapt)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    sample, losses = sampler(), []
    for step in range(n):  # the loop of gpt_meta.meta_train_head / coldstart.meta_train before issue 12
        losses.append(float(M.meta_step(ref, params, frozen, sample(step), opt, first_order=first_order, **KW)))
    model = make_mlp()
    method = M.MAML(STEPS, LR, first_order=first_order, adapt=adapt)
    log = M.meta_train(model, method, sampler(), n, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2))
    assert log.losses == losses and log.best_step is None and log.scores == []
    assert same_params(ref, model)


def test_meta_train_meta_sgd_learns_the_rates_like_the_plain_loop():
    n = 5
    ref = make_mlp()
    params, frozen = M.split_params(ref)
    lrs = M.init_meta_sgd_lrs(params, init=LR)
    opt = torch.optim.Adam([*ref.parameters(), *lrs.values()], lr=1e-2)
    sample = sampler()
    for step in range(n):
        M.meta_step(ref, params, frozen, sample(step), opt, loss_fn=M.mse_loss_per_example, steps=1, inner_lr=lrs)
    model = make_mlp()
    lrs2 = M.init_meta_sgd_lrs(M.split_params(model)[0], init=LR)
    opt2 = torch.optim.Adam([*model.parameters(), *lrs2.values()], lr=1e-2)
    M.meta_train(model, M.MAML(1, lrs2), sampler(), n, optimizer=opt2)
    assert same_params(ref, model)
    assert all(torch.equal(lrs[k], lrs2[k]) for k in lrs) and not torch.equal(lrs["2.weight"], torch.full_like(lrs["2.weight"], LR))


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_meta_train_reptile_equals_the_plain_loop_and_its_definition(adapt):
    n, eps = 5, 0.7
    ref = make_mlp()
    params, frozen = M.split_params(ref, adapt=adapt)
    sample = sampler()
    for step in range(n):  # epsilon annealed linearly to 0, as in chapter 3 and the old loops
        M.load_params_(ref, M.reptile_step(ref, params, frozen, sample(step), epsilon=eps * (1 - step / n), **KW))
    model = make_mlp()
    log = M.meta_train(model, M.Reptile(STEPS, LR, eps, adapt=adapt), sampler(), n)
    assert same_params(ref, model) and log.losses == []
    # one update by its definition: phi + epsilon (1 - progress) mean_i(phi_i - phi), frozen untouched
    model, batch_tasks = make_mlp(), make_tasks(SIZES_S, SIZES_Q)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    params, _ = M.split_params(model, adapt=adapt)
    M.Reptile(3, LR, eps, adapt=adapt).update(model, pad_tasks(batch_tasks), None, 0.25)

    def sgd(x, y):  # three full-batch SGD steps on the adapted parameters only
        p = {k: before[k].clone().requires_grad_(True) for k in params}
        for _ in range(3):
            gs = torch.autograd.grad(ref_loss(model, {**before, **p}, x, y), list(p.values()))
            p = {k: (v - LR * g).detach().requires_grad_(True) for (k, v), g in zip(p.items(), gs)}
        return p

    moved = [sgd(torch.cat([xs, xq]), torch.cat([ys, yq])) for xs, ys, xq, yq in batch_tasks]
    for k, p in model.named_parameters():
        want = before[k] + eps * 0.75 * torch.stack([m[k].detach() - before[k] for m in moved]).mean(0) if k in params else before[k]
        assert torch.allclose(p.detach(), want, rtol=1e-12, atol=1e-15), k


def test_meta_train_early_stopping_restores_the_best_state():
    model = make_mlp()
    scripted, seen = iter([3.0, 2.0, 2.5, 2.7, 2.9, 1.0]), []

    def validate():
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(scripted)

    log = M.meta_train(model, M.MAML(1, LR), sampler(), 12, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                       validate=validate, every=2, stop=train.EarlyStopping(patience=3))
    assert log.scores == [(2, 3.0), (4, 2.0), (6, 2.5), (8, 2.7), (10, 2.9)]  # 3 checks without improvement
    assert log.best_step == 4 and len(log.losses) == 10
    assert all(torch.equal(v, seen[1][k]) for k, v in model.state_dict().items())
    assert not torch.equal(seen[1]["0.weight"], seen[3]["0.weight"])


def test_meta_train_keeps_the_best_checkpoint_of_a_dict_without_stopping():
    """Chapter 9's residual head: Meta-SGD, validation every N steps and after the last, the best
    (init, rates) kept by validation AUC; an improvement below TIE_TOL is a tie, won by the earlier."""
    model = make_mlp()
    params, _ = M.split_params(model, adapt="head")
    lrs = M.init_meta_sgd_lrs(params, init=LR)
    keep = {**params, **{"lr:" + k: v for k, v in lrs.items()}}
    scripted, seen = iter([0.5, 0.7, 0.7 + 1e-12]), []

    def validate():
        seen.append({k: v.detach().clone() for k, v in keep.items()})
        return next(scripted)

    opt = torch.optim.Adam([*params.values(), *lrs.values()], lr=1e-2)
    log = M.meta_train(model, M.MAML(1, lrs, adapt="head"), sampler(), 7, optimizer=opt, validate=validate, every=3,
                       stop=train.EarlyStopping(patience=None, mode="max"), keep=keep)
    assert [s for s, _ in log.scores] == [3, 6, 7] and log.best_step == 6 and len(log.losses) == 7
    assert all(torch.equal(v, seen[1][k]) for k, v in keep.items())
    assert not torch.equal(seen[1]["lr:4.weight"], seen[2]["lr:4.weight"])


def test_meta_train_with_validate_needs_stop():
    model = make_mlp()
    with pytest.raises(ValueError, match="needs stop="):
        M.meta_train(model, M.MAML(1, LR), sampler(), 2, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                     validate=lambda: 1.0)


def test_meta_train_takes_any_method_object():
    calls = []

    class Joint:  # joint training as a method: one Adam step on the pooled loss at theta
        def update(self, model, batch, optimizer, progress):
            calls.append(progress)
            optimizer.zero_grad()
            pred = model(torch.cat([batch.x_support, batch.x_query], 1)).squeeze(-1)
            per = (pred - torch.cat([batch.y_support, batch.y_query], 1)) ** 2
            loss = M.masked_mean(per.reshape(1, -1), torch.cat([batch.mask_support, batch.mask_query], 1).reshape(1, -1))[0]
            loss.backward()
            optimizer.step()
            return loss.item()

    model = make_mlp()
    log = M.meta_train(model, Joint(), sampler(), 4, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2))
    assert calls == [0.0, 0.25, 0.5, 0.75] and len(log.losses) == 4 and log.losses[-1] < log.losses[0] * 2


# ------------------------------------------------------------------------------------------
# Metric heads
# ------------------------------------------------------------------------------------------


def metric_batch(seed=0, T=3, S=6, Q=4, D=5):
    g = torch.Generator().manual_seed(seed)
    es = torch.randn(T, S, D, generator=g, dtype=DT)
    eq = torch.randn(T, Q, D, generator=g, dtype=DT)
    ys = torch.randint(0, 2, (T, S), generator=g)
    ys[0, :] = torch.tensor([0, 1, 0, 1, 1, 0])
    mask = torch.ones(T, S, dtype=torch.bool)
    mask[0, 4:] = False  # padding
    ys[1, :] = 1  # class 0 absent in task 1
    mask[2, :2] = False
    ys[2, 2:] = 0  # class 1 absent among the real entries of task 2 (present in padding only)
    ys[2, :2] = 1
    return es, ys, eq, mask


def test_prototypical_logits_match_hand_loop():
    es, ys, eq, mask = metric_batch()
    fb = torch.randn(2, es.shape[-1], dtype=DT)
    logits = M.prototypical_logits(es, ys, eq, mask, fallback_prototypes=fb)
    assert logits.shape == (3, 4, 2)
    for t in range(3):
        for c in range(2):
            rows = [es[t, i] for i in range(es.shape[1]) if mask[t, i] and ys[t, i] == c]
            proto = torch.stack(rows).mean(0) if rows else fb[c]
            for q in range(eq.shape[1]):
                expected = -sum((eq[t, q, d] - proto[d]) ** 2 for d in range(es.shape[-1]))
                assert torch.allclose(logits[t, q, c], expected, rtol=1e-12)
    # one task at a time (no task dimension) gives the same numbers
    assert torch.allclose(M.prototypical_logits(es[0], ys[0], eq[0], mask[0]), logits[0])


def test_matching_logits_match_hand_loop_and_sum_to_one():
    es, ys, eq, mask = metric_batch()
    logp = M.matching_logits(es, ys, eq, mask, temperature=0.5)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3, 4, dtype=DT), rtol=1e-12)
    for t in range(3):
        idx = [i for i in range(es.shape[1]) if mask[t, i]]
        labels = [int(ys[t, i]) for i in idx]
        for q in range(eq.shape[1]):
            sims = [F.cosine_similarity(eq[t, q], es[t, i], dim=0) / 0.5 for i in idx]
            for c in range(2):
                if c not in labels:  # absent class: one pseudo example with similarity 0
                    sims.append(torch.tensor(0.0, dtype=DT))
                    labels.append(c)
            w = torch.softmax(torch.stack(sims), 0)
            for c in range(2):
                p = sum(w[j] for j, lab in enumerate(labels) if lab == c)
                assert torch.allclose(logp[t, q, c].exp(), p, rtol=1e-10)
            labels = [int(ys[t, i]) for i in idx]


def test_missing_class_and_padding_give_no_nan_values_or_gradients():
    es, ys, eq, mask = metric_batch()
    es = es.clone()
    es[0, 4:] = float("nan")  # garbage in padded rows
    es.requires_grad_(True)
    eq = eq.clone().requires_grad_(True)
    yq = torch.randint(0, 2, (3, 4))
    for fn in (M.prototypical_logits, M.matching_logits):
        out = fn(es, ys, eq, mask)
        assert torch.isfinite(out).all()
        loss = F.cross_entropy(out.reshape(-1, 2), yq.reshape(-1))
        ge, gq = torch.autograd.grad(loss, [es, eq])
        assert torch.isfinite(gq).all() and torch.isfinite(ge[mask]).all()
        assert (ge[~mask] == 0).all()
    # a task whose support is entirely padding
    none = torch.zeros_like(mask)
    assert torch.isfinite(M.prototypical_logits(es.detach(), ys, eq.detach(), none)).all()
    uniform = M.matching_logits(es.detach(), ys, eq.detach(), none).exp()
    assert torch.allclose(uniform, torch.full_like(uniform, 0.5))


def test_metric_heads_work_under_vmap():
    es, ys, eq, mask = metric_batch()
    for fn in (M.prototypical_logits, M.matching_logits):
        batched = torch.func.vmap(lambda a, b, c, m: fn(a, b, c, m))(es, ys, eq, mask)
        assert torch.allclose(batched, fn(es, ys, eq, mask), rtol=1e-12)


# ------------------------------------------------------------------------------------------
# Losses and errors
# ------------------------------------------------------------------------------------------


def test_loss_helpers():
    pred, y = torch.randn(5, 1, dtype=DT), torch.randn(5, dtype=DT)
    assert torch.allclose(M.mse_loss_per_example(pred, y), (pred.squeeze(-1) - y) ** 2)
    t = torch.randint(0, 2, (5,)).to(DT)
    assert torch.allclose(M.bce_loss_per_example(pred, t), F.binary_cross_entropy_with_logits(pred.squeeze(-1), t, reduction="none"))
    v, m = torch.tensor([1.0, 2.0, 100.0]), torch.tensor([1, 1, 0])
    assert M.masked_mean(v, m).item() == 1.5
    assert torch.allclose(M.masked_mean(torch.ones(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]])), torch.tensor([1.0, 0.0]))


def test_bad_inputs_raise_clear_errors(setup):
    model, params, frozen, tasks, batch = setup
    with pytest.raises(ValueError, match="one loss per example"):
        M.maml_loss(model, params, frozen, batch, loss_fn=lambda p, y: ((p.squeeze(-1) - y) ** 2).mean(), steps=1, inner_lr=LR)
    with pytest.raises(ValueError, match="unknown adapt spec"):
        M.split_params(model, adapt="body")
    with pytest.raises(ValueError, match="selects no parameter"):
        M.split_params(model, adapt=["7"])
    assert not math.isnan(M.masked_mean(torch.tensor([float("inf")]), torch.tensor([False])).item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(setup):
    model, params, frozen, _, batch = setup
    l_cpu, g_cpu = M.meta_gradient(model, params, frozen, batch, **KW)
    mc = make_mlp().cuda()
    pc, fc = M.split_params(mc)
    bc = batch.to("cuda")
    l_gpu, g_gpu = M.meta_gradient(mc, pc, fc, bc, **KW)
    assert torch.allclose(l_gpu.cpu(), l_cpu, rtol=1e-10)
    for n in g_cpu:
        assert torch.allclose(g_gpu[n].cpu(), g_cpu[n], rtol=1e-8, atol=1e-12)
    new = M.reptile_step(mc, pc, fc, bc, epsilon=0.5, **KW)
    assert all(v.is_cuda for v in new.values())
    es, ys, eq, mask = (t.cuda() for t in metric_batch())
    assert M.matching_logits(es, ys, eq, mask).is_cuda and M.prototypical_logits(es, ys, eq, mask).is_cuda
