"""Pre-training: next-token prediction on packed documents (the built-in corpus or built shards)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import jax
import numpy as np

from jaxllm import checkpoint, config as config_lib, losses, models, optim
from jaxllm.config import Config
from jaxllm.data import corpus, pipeline, shards, tokenizer as tokenizers
from jaxllm.generate import sampling
from jaxllm.models import transformer
from jaxllm.parallel import memory, mesh as mesh_lib, rules
from jaxllm.train import loop, state as state_lib, step as step_lib

log = logging.getLogger(__name__)
SAMPLE_PROMPTS = ("def ", "import ", "class ", "The ")


def loss_fn(params, batch, rng, *, cfg: Config):
    del rng
    logits = transformer.logits(params, cfg.model, batch["tokens"], batch["positions"], batch["segment_ids"])
    return losses.next_token(logits, batch, z_loss=cfg.train.z_loss)


def make_evaluate(cfg: Config, batches: list[dict], mesh=None):
    """params -> {loss, perplexity, accuracy} over fixed held-out batches, token-weighted.

    With a mesh, each batch (held whole by every host) becomes a global array sharded like training batches.
    """
    if mesh is not None:
        batches = [rules.full_batch_to_global(b, mesh) for b in batches]

    @jax.jit
    def one(params, batch):
        _, m = loss_fn(params, batch, None, cfg=cfg)
        return m["loss"] * m["weight"], m["accuracy"] * m["weight"], m["weight"]

    def evaluate(params) -> dict:
        sums = np.sum([jax.device_get(one(params, b)) for b in batches], axis=0)
        mean_loss = float(sums[0] / max(sums[2], 1.0))
        return {"loss": mean_loss, "perplexity": float(np.exp(mean_loss)),
                "accuracy": float(sums[1] / max(sums[2], 1.0))}

    return evaluate


def make_sample(cfg: Config, tok):
    eos = tokenizers.eos_id(tok)

    def sample(params, step: int) -> list[dict]:
        out = []
        for i, prompt in enumerate(SAMPLE_PROMPTS[: cfg.train.num_samples]):
            key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed + 1), step * 100 + i)
            ids = sampling.simple_generate(params, cfg.model, tok.encode(prompt).ids, key,
                                           max_new_tokens=cfg.train.sample_tokens, temperature=0.8, eos_id=eos)
            out.append({"prompt": prompt, "text": tok.decode(ids)})
        return out

    return sample


def load_data(cfg: Config):
    """(tokenizer, train source, eval batches, data fingerprint), from the built-in corpus or built shards.

    The train source is PackedRows (built-in corpus) or a pipeline.Mixture of per-source rows (shards);
    pipeline.train_batches takes either."""
    if cfg.data.path or cfg.data.source == "shards":
        return load_shards(cfg)
    tok = corpus.get_tokenizer(cfg.data, cfg.model.vocab_size)
    train, heldout = corpus.builtin_streams(cfg.data, tok)
    train.check_vocab(cfg.model.vocab_size, "training data")
    heldout.check_vocab(cfg.model.vocab_size, "held-out data")
    train_rows = pipeline.PackedRows(train, cfg.data.seq_len)
    eval_rows = pipeline.PackedRows(heldout, cfg.data.seq_len)
    eval_b = pipeline.eval_batches(eval_rows, cfg.train.batch_size, cfg.train.eval_batches)
    fp = pipeline.fingerprint({"data": config_lib.to_dict(cfg.data), "tok": tokenizers.fingerprint(tok),
                               "batch": cfg.train.batch_size, "seed": cfg.train.seed})
    return tok, train_rows, eval_b, fp


def load_shards(cfg: Config):
    """Shards built by `jaxllm data build` at data.path, mixed by the build's source weights (or data.mixture)."""
    path = cfg.data.path
    manifest, train, weights, heldout = shards.load_build(path, cfg.data.seq_len, cfg.model.vocab_size)
    weights = shards.override_weights([r.name.split("/")[0] for r in train], weights, cfg.data.mixture)
    train, weights = [r for r, w in zip(train, weights) if w > 0], [w for w in weights if w > 0]
    tok = tokenizers.load(Path(path) / "tokenizer.json" if cfg.data.tokenizer == "builtin" else cfg.data.tokenizer)
    if tokenizers.fingerprint(tok) != manifest["tokenizer"]["sha256"]:
        raise pipeline.DataError(f"data.tokenizer={cfg.data.tokenizer} is not the tokenizer {path} was built with; "
                                 "leave data.tokenizer=builtin to use the build's own tokenizer.json")
    eval_b = pipeline.eval_batches(heldout, cfg.train.batch_size, cfg.train.eval_batches)
    fp = pipeline.fingerprint({"data": config_lib.to_dict(cfg.data), "manifest": shards.manifest_hash(manifest),
                               "batch": cfg.train.batch_size, "seed": cfg.train.seed})
    total_rows = cfg.train.steps * cfg.train.batch_size
    log.info("shards %s: %s", path, "; ".join(
        f"{r.name}: {len(r)} rows, weight {w:g} -> {total_rows * w / sum(weights) / len(r):.2f} epochs in "
        f"{cfg.train.steps} steps" for r, w in zip(train, weights)))
    return tok, pipeline.Mixture(tuple(train), tuple(weights)), eval_b, fp


def plan_state(cfg: Config, optimizer, mesh):
    """(make, abstract state, state shardings): `make()` builds the initial TrainState; nothing allocated."""

    def make():
        _, params = models.init(cfg.model, cfg.train.seed)
        return state_lib.create(params, optimizer, cfg.train.seed)

    abstract = jax.eval_shape(make)
    shardings = rules.state_shardings(abstract, models.param_shardings(cfg.model, mesh), mesh)
    return make, abstract, shardings


def init_state(cfg: Config, total_steps: int, mesh=None):
    """(graphdef, optimizer, state); with a mesh the state is born sharded (jit with out_shardings)."""
    optimizer = optim.adamw(cfg.optim, total_steps)
    if mesh is None:
        graphdef, params = models.init(cfg.model, cfg.train.seed)
        return graphdef, optimizer, state_lib.create(params, optimizer, cfg.train.seed)
    graphdef, _ = models.abstract(cfg.model)
    make, _, shardings = plan_state(cfg, optimizer, mesh)
    return graphdef, optimizer, rules.init_sharded(make, shardings)


def setup_mesh(cfg: Config):
    """Start jax.distributed when asked (before any computation), then the mesh from cfg.mesh, checked."""
    if cfg.distributed:
        mesh_lib.initialize_distributed(cfg.cluster)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    mesh_lib.check_batch(mesh, cfg.train.batch_size, cfg.optim.accum_steps)
    if cfg.train.batch_size % jax.process_count():
        raise config_lib.ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                                     f"{jax.process_count()} processes")
    log.info("%s", mesh_lib.describe(mesh))
    return mesh


def _has_checkpoint(run_dir: Path, keep: int) -> bool:
    mgr = checkpoint.manager(run_dir / "checkpoints", keep=keep, use_async=False)
    try:
        return mgr.latest_step() is not None
    finally:
        mgr.close()


def run(cfg: Config) -> Path:
    """Train (or resume) runs/<train.name> on the mesh of cfg.mesh; returns the run directory."""
    mesh = setup_mesh(cfg)
    run_dir = Path(cfg.train.runs_dir) / cfg.train.name
    resuming = loop.prepare_run_dir(run_dir, config_lib.to_dict(cfg), compare=("model", "data"))
    tok, train_rows, eval_b, fp = load_data(cfg)
    if jax.process_index() == 0:
        tok.save(str(run_dir / "tokenizer.json"))
    optimizer = optim.adamw(cfg.optim, cfg.train.steps)
    make, abstract, shardings = plan_state(cfg, optimizer, mesh)
    memory.log_report(memory.report(abstract, shardings, mesh, cfg.model, batch_size=cfg.train.batch_size,
                                    seq_len=cfg.data.seq_len, accum_steps=cfg.optim.accum_steps), log)
    if _has_checkpoint(run_dir, cfg.checkpoint.keep):  # the loop restores onto these shardings: skip a throw-away init
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    else:
        state = rules.init_sharded(make, shardings)
    log.info("model: %.2fM parameters; %d training rows of %d tokens%s", models.count_params(state.params) / 1e6,
             len(train_rows), cfg.data.seq_len, " (resuming)" if resuming else "")
    train_step = step_lib.make_train_step(partial(loss_fn, cfg=cfg), optimizer, accum_steps=cfg.optim.accum_steps,
                                          lr_schedule=optim.schedule(cfg.optim, cfg.train.steps),
                                          state_shardings=shardings, batch_sharding=rules.batch_sharding(mesh))
    sample = make_sample(cfg, tok)
    if jax.process_count() > 1:
        log.info("samples during training are off with several processes; use `jaxllm generate` on the run")
        sample = None
    with jax.set_mesh(mesh):
        hooks = loop.Hooks(train_step=train_step,
                           batches=pipeline.train_batches(train_rows, cfg.train.batch_size, cfg.train.seed),
                           put_batch=partial(rules.host_batch_to_global, mesh=mesh),
                           evaluate=make_evaluate(cfg, eval_b, mesh), sample=sample, data_fingerprint=fp)
        loop.fit(run_dir=run_dir, state=state, hooks=hooks, steps=cfg.train.steps, ckpt_cfg=cfg.checkpoint,
                 train_cfg=cfg.train)
    return run_dir
