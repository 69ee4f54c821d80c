"""Static block-sparse attention: the plan of each training mask is exact, and the block path
gives the dense masked path's outputs and gradients (fp32, CPU), with the same fallbacks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from adastate_jax.models import attention as attn
from adastate_jax.models import wan
from adastate_jax.training.objectives import flow_matching as fm
from tests.subproc import TOLERANT_COMPILE

MASKS = {
    "block_causal": lambda: attn.block_causal_mask(7, 3),
    "block_causal_1": lambda: attn.block_causal_mask(5, 1),
    "windowed_sink": lambda: attn.windowed_block_causal_mask(10, 2, window=3, sink=1),
    "windowed_sink_2": lambda: attn.windowed_block_causal_mask(9, 3, window=4, sink=2),
    "teacher_forcing": lambda: attn.teacher_forcing_mask(6, 2),
    "teacher_forcing_window_sink": lambda: attn.teacher_forcing_mask(9, 3, window=3, sink=1),
    "teacher_forcing_window": lambda: attn.teacher_forcing_mask(8, 2, window=2),
}


def _general_mask(seed=0, fq=11, fk=13):
    """Rows drawn from a few random patterns: groups are non-contiguous, keys have gaps."""
    rng = np.random.default_rng(seed)
    patterns = rng.random((4, fk)) < 0.4
    patterns[:, 0] = True  # no empty row
    return patterns[rng.integers(0, 4, fq)]


@pytest.mark.parametrize("kind", [*MASKS, "general"])
def test_plan_reproduces_the_mask(kind):
    mask = _general_mask() if kind == "general" else MASKS[kind]()
    plan = attn.plan_frame_mask(mask)
    np.testing.assert_array_equal(plan.to_mask(), mask)
    # groups partition the query frames
    covered = sorted(i for g in plan.groups for a, b in g.q_ranges for i in range(a, b))
    assert covered == list(range(mask.shape[0]))
    assert plan.density == pytest.approx(mask.mean())
    assert hash(plan) == hash(attn.plan_frame_mask(mask.copy())) and plan == attn.plan_frame_mask(mask)


def test_plan_shapes_of_the_training_masks():
    bc = attn.plan_frame_mask(attn.block_causal_mask(21, 3))
    assert len(bc.groups) == 7 and all(len(g.q_ranges) == 1 and len(g.k_ranges) == 1 for g in bc.groups)
    assert bc.density == pytest.approx(4 / 7)  # (1 + 2 + ... + 7) / 49
    tf = attn.plan_frame_mask(attn.teacher_forcing_mask(21, 3))
    assert len(tf.groups) == 14 and max(len(g.k_ranges) for g in tf.groups) == 2
    assert tf.density < 0.3


def test_a_query_without_keys_is_an_error():
    mask = attn.block_causal_mask(4, 2)
    mask[1] = False
    with pytest.raises(ValueError, match=r"query frame\(s\) \[1\] may attend to no key"):
        attn.plan_frame_mask(mask)


def test_block_attention_equals_masked_attention():
    b, n, h, pq, pk = 2, 3, 8, 5, 4
    mask = _general_mask(1, fq=6, fk=7)
    plan = attn.plan_frame_mask(mask)
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (b, 6 * pq, n, h))
    k = jax.random.normal(kk, (b, 7 * pk, n, h))
    v = jax.random.normal(kv, (b, 7 * pk, n, h))
    dense = jax.jit(lambda q, k, v: attn.attention(q, k, v, attn.expand_frame_mask(mask[None], pq, pk)))(
        q, k, v
    )
    block = jax.jit(lambda q, k, v: attn.block_attention(q, k, v, plan, pq, pk))(q, k, v)
    np.testing.assert_allclose(block, dense, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="query frames"):
        attn.block_attention(q[:, :-1], k, v, plan, pq, pk)


# --------------------------------------------------------------------------------------------
# the model: block path == dense path
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    cfg = wan.WanConfig.tiny(zero_init_head=False, num_layers=2)
    graphdef, params = nnx.split(wan.create_model(cfg, seed=3))
    dense = nnx.split(wan.create_model(dataclasses.replace(cfg, attention_blocks="dense"), seed=3))[0]
    return cfg, graphdef, dense, params


@pytest.fixture
def count_blocks(monkeypatch):
    calls = []
    real = attn.block_attention

    def counting(*a, **k):
        calls.append(a[3])
        return real(*a, **k)

    monkeypatch.setattr(attn, "block_attention", counting)
    return calls


def _inputs(cfg, b=2, f=6, seed=7):
    k = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k[0], (b, f, 4, 6, cfg.in_channels))
    t = jax.random.uniform(k[1], (b, f), minval=0, maxval=1000)
    text = jax.random.normal(k[2], (b, cfg.text_len, cfg.text_dim))
    return x, t, text


FORWARD_MASKS = {
    "block_causal": lambda: attn.block_causal_mask(6, 2),
    "windowed_sink": lambda: attn.windowed_block_causal_mask(6, 2, window=2, sink=1),
    "teacher_forcing_window_sink": lambda: attn.teacher_forcing_mask(3, 1, window=1, sink=1),
}


def _close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("with_ctx", [False, True], ids=["no_ctx", "static_ctx"])
@pytest.mark.parametrize("kind", list(FORWARD_MASKS))
def test_forward_block_path_equals_dense(models, count_blocks, kind, with_ctx):
    cfg, g_auto, g_dense, params = models
    own = FORWARD_MASKS[kind]()
    f = own.shape[0]
    x, t, text = _inputs(cfg, f=f)
    pos = jnp.arange(f) + 3
    s = 3
    valid = np.array([[True, False, True]] * 2)
    mask = own
    if with_ctx:
        ctx_part = np.ones((f, s), bool)
        ctx_part[::2, 0] = False  # some query frames skip a context frame
        mask = np.concatenate([ctx_part, own], axis=1)
    ck, cv = jax.random.normal(jax.random.key(9), (2, cfg.num_layers, 2, s, 6, cfg.num_heads, cfg.head_dim))

    def both(x, t, text, ck, cv):  # one compile for both paths (test time)
        ctx = None
        if with_ctx:
            ctx = wan.Context(ck, cv, jnp.broadcast_to(jnp.arange(s), (2, s)), valid)
        return [wan.forward(gd, params, x, t, text, pos, ctx, mask) for gd in (g_auto, g_dense)]

    block, dense = jax.jit(both)(x, t, text, ck, cv)
    assert len(count_blocks) == 1  # traced once, for the auto model only
    plan = count_blocks[0]
    expect = mask & np.concatenate([valid[0], np.ones(f, bool)])[None] if with_ctx else mask
    np.testing.assert_array_equal(plan.to_mask(), expect)
    for a, b in zip(block, dense):
        if a is not None:
            _close(a, b)


def test_traced_mask_or_context_validity_falls_back_to_dense(models, count_blocks):
    cfg, g_auto, g_dense, params = models
    f = 4
    x, t, text = _inputs(cfg, f=f)
    mask = attn.block_causal_mask(f, 2)
    traced = jax.jit(lambda m: wan.forward(g_auto, params, x, t, text, jnp.arange(f), None, m).velocity)(mask)
    assert not count_blocks
    dense = jax.jit(lambda: wan.forward(g_dense, params, x, t, text, jnp.arange(f), None, mask).velocity)()
    _close(traced, dense)
    jax.eval_shape(lambda: wan.forward(g_auto, params, x, t, text, jnp.arange(f), None, mask))
    assert len(count_blocks) == 1  # the same mask, static: block path
    # static mask but traced context validity: dense
    ck = jnp.zeros((cfg.num_layers, 2, 1, 6, cfg.num_heads, cfg.head_dim))
    ctx_mask = np.concatenate([np.ones((f, 1), bool), mask], axis=1)

    def with_ctx(valid):
        ctx = wan.Context(ck, ck, jnp.zeros((2, 1), jnp.int32), valid)
        return wan.forward(g_auto, params, x, t, text, jnp.arange(f), ctx, ctx_mask).velocity

    jax.eval_shape(with_ctx, jnp.ones((2, 1), bool))
    assert len(count_blocks) == 1
    # per-example masks that differ across the batch: dense
    per_example = np.stack([mask, np.ones_like(mask)])
    jax.eval_shape(lambda: wan.forward(g_auto, params, x, t, text, jnp.arange(f), None, per_example))
    assert len(count_blocks) == 1
    # key mass requested: dense (it needs the full probabilities)
    out = jax.eval_shape(
        lambda: wan.forward(g_auto, params, x, t, text, jnp.arange(f), None, mask, return_key_mass=True)
    )
    assert len(count_blocks) == 1 and out.key_mass is not None
    # the dense setting never plans
    jax.eval_shape(lambda: wan.forward(g_dense, params, x, t, text, jnp.arange(f), None, mask))
    assert len(count_blocks) == 1
    with pytest.raises(ValueError, match=r"config\.model\.attention_blocks"):
        wan.WanConfig.tiny(attention_blocks="sparse")


LAYOUTS = {
    "diffusion_forcing": fm.ClipLayout("diffusion_forcing", chunk_frames=2),
    "teacher_forcing_window_sink": fm.ClipLayout(
        "teacher_forcing", chunk_frames=1, window_frames=1, sink_frames=1, context_noise=20.0
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_flow_matching_gradients_equal(models, count_blocks, layout):
    """Gradients of the flow-matching loss through `clip_forward`: block path == dense path; for
    diffusion forcing also under the 'save_attention_out' remat policy (which names the attention
    output)."""
    cfg, g_auto, g_dense, params = models
    x0, _, text = _inputs(cfg, f=4 if layout == "diffusion_forcing" else 3, seed=11)
    table = jnp.linspace(999.0, 1.0, 1000)

    def grad(gd, p):
        layout_ = LAYOUTS[layout]
        loss = lambda p: fm.flow_matching_loss(gd, p, x0, text, jax.random.key(5), layout_, "chunk", table)[0]  # noqa: E731
        return jax.value_and_grad(loss)(p)

    graphs = [g_auto, g_dense]
    if layout == "diffusion_forcing":
        graphs.append(
            nnx.split(wan.create_model(dataclasses.replace(cfg, remat="save_attention_out"), seed=3))[0]
        )
    # one compile for all variants (test time)
    (l_block, g_block), *others = jax.jit(
        lambda p: [grad(g, p) for g in graphs], compiler_options=TOLERANT_COMPILE
    )(params)
    assert len(count_blocks) == len(graphs) - 1
    for l_other, g_other in others:
        _close(l_block, l_other)
        for a, b in zip(jax.tree.leaves(g_block), jax.tree.leaves(g_other)):
            _close(a, b, rtol=1e-4, atol=1e-7)


def test_cudnn_block_path_calls_unmasked_cudnn(models, monkeypatch):
    """With attention='cudnn' the block path asks for cuDNN with no mask (checked on CPU by
    recording the calls; the cuDNN kernel itself needs a GPU)."""
    cfg, _, _, params = models
    g_cudnn = nnx.split(
        wan.create_model(dataclasses.replace(cfg, attention="cudnn", dtype="bfloat16"), seed=3)
    )[0]
    calls = []
    real = jax.nn.dot_product_attention

    def record(q, k, v, *a, mask=None, implementation=None, **kw):
        calls.append((q.shape[1], k.shape[1], q.dtype, mask is None, implementation))
        return real(q, k, v, *a, mask=mask, implementation=None, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    x, t, text = _inputs(cfg, f=4)
    jax.eval_shape(
        lambda: wan.forward(g_cudnn, params, x, t, text, jnp.arange(4), None, attn.block_causal_mask(4, 2))
    )
    self_calls = [c for c in calls if c[1] != cfg.text_len]
    p = 6
    assert {(c[0], c[1]) for c in self_calls} == {(2 * p, 2 * p), (2 * p, 4 * p)}
    assert all(c[2] == jnp.bfloat16 and c[3] and c[4] == "cudnn" for c in calls)


def test_cudnn_gets_the_streaming_key_mask_at_full_query_length(monkeypatch):
    """cuDNN's fused attention refuses a key-only mask [B, 1, 1, K] ("Bias must have same seq length
    as QKV", seen on an H200): `attention` broadcasts it to [B, 1, T, K] for cuDNN only."""
    seen = []
    real = jax.nn.dot_product_attention

    def record(q, k, v, *a, mask=None, implementation=None, **kw):
        seen.append((implementation, None if mask is None else mask.shape))
        return real(q, k, v, *a, mask=mask, implementation=None, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", record)
    q = jnp.ones((2, 5, 2, 8), jnp.bfloat16)
    kv = jnp.ones((2, 7, 2, 8), jnp.bfloat16)
    key_mask = jnp.arange(7)[None, None, None, :] < jnp.array([4, 7])[:, None, None, None]  # [2, 1, 1, 7]
    out_cudnn = attn.attention(q, kv, kv, key_mask, "cudnn")
    out_xla = attn.attention(q, kv, kv, key_mask, "xla")
    assert seen == [("cudnn", (2, 1, 5, 7)), (None, (2, 1, 1, 7))]
    np.testing.assert_array_equal(np.asarray(out_cudnn, np.float32), np.asarray(out_xla, np.float32))
