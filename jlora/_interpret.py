"""The interpreter behind `jlora.lora`: a symbolic value, an environment, a loop.

Laid out as JAX's own `jax.core.eval_jaxpr`: `interpret` walks a jaxpr's equations with
an environment (`read` / `write`), re-binding each primitive on its inputs. An input may
be a `Factored` value, an adapted kernel held as `w + scale * a @ b`; an equation that
touches one goes to its primitive's rule in the table the caller passes in
(`Context.rules`, filled by `_rules.py`), and with no rule the kernel is materialized
for that one equation (`Context.materialize`: a warning, or `RuleError` in strict mode).
Each equation runs under its own source info, name stack and context (compute type,
metadata) as in JAX's loop, and values are dropped after their last use.

This module imports nothing that imports it: the rules import it, and `_transform.py`
(the public face) brings the two together.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jlora import _jax_compat as compat
from jlora._targets import path_key
from jlora._weight import Layout, dora_factor, materialize, out_to_kernel


class RuleError(RuntimeError):
    """Raised in strict mode when an adapted kernel would be materialized."""


@dataclasses.dataclass(frozen=True)
class Factored:
    """An adapted kernel inside the interpreter: `w + scale * a @ b`, never formed.

    `jlora.LoraWeight` is the parameter node users hold in their params (it may hold
    boxes and is a pytree of `w`, `a`, `b`); `Factored` is what the interpreter holds
    in place of one array of the traced function while `lora(fn)` runs: unboxed arrays,
    the frozen `w` behind a `stop_gradient`, and the path that names the kernel in
    messages and dropout keys. Rules return new `Factored` values for equations that
    keep the low-rank form (a transpose, a cast, a layer taken out of a stack).
    A pytree of `w`, `a`, `b`, so it passes through `jax` transforms inside rules.
    """

    w: Any
    a: Any
    b: Any
    scale: float
    layout: Layout
    path: str
    dropout: float
    m: Any = None  # DoRA's magnitude laid out as `b` with a rank axis of size 1
    fixed: bool = False  # `m` holds the factor `m / norm` itself (a mixed batch's row)

    @property
    def dense_w(self):
        """The frozen kernel as an array (a quantized one dequantized)."""
        w = self.w
        return w.value() if hasattr(w, "value") and hasattr(w, "q") else w

    def magnitude_factor(self):
        """DoRA's `m / ||w + scale * a @ b||` laid out as `b` (rank axis of size 1),
        the norm under `stop_gradient`; None without DoRA."""
        if self.m is None:
            return None
        if self.fixed:
            return self.m
        ns = len(self.layout.stack_axes)
        g = dora_factor(
            self.dense_w, self.a, self.b, self.layout, self.scale, jnp.squeeze(self.m, ns)
        )
        return jnp.expand_dims(g, ns)

    @property
    def shape(self):
        return jnp.shape(self.w)

    @property
    def dtype(self):
        return self.w.dtype

    def replace(self, **kw) -> Factored:
        return dataclasses.replace(self, **kw)

    def materialize(self):
        if self.fixed:  # g * (w + scale * a @ b), g given
            ns = len(self.layout.stack_axes)
            v = materialize(self.dense_w, self.a, self.b, self.layout, self.scale)
            g = out_to_kernel(jnp.squeeze(self.m, ns), self.layout)
            return (v.astype(jnp.float32) * g).astype(v.dtype)
        m = None if self.m is None else jnp.squeeze(self.m, len(self.layout.stack_axes))
        return materialize(self.dense_w, self.a, self.b, self.layout, self.scale, m)


jax.tree_util.register_pytree_node(
    Factored,
    lambda f: ((f.w, f.a, f.b, f.m), (f.scale, f.layout, f.path, f.dropout, f.fixed)),
    lambda aux, ch: Factored(*ch[:3], *aux[:4], m=ch[3], fixed=aux[4]),
)


def is_factored(x) -> bool:
    return isinstance(x, Factored)


@dataclasses.dataclass
class Context:
    """Per-call interpreter state: the rule table, the dropout key, strictness, and a
    record of which rule handled which kernel (shared by every nested interpretation
    of one call)."""

    rules: dict[str, Callable] = dataclasses.field(default_factory=dict)
    rng: Any = None
    strict: bool = False
    record: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    warned: set = dataclasses.field(default_factory=set)
    sites: dict[str, int] = dataclasses.field(default_factory=dict)
    in_shard_map: bool = False
    manual_axes: frozenset = frozenset()
    vma_checked: bool = True
    joints: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def note(self, f: Factored, rule: str) -> None:
        """Records `rule` for the kernel `f` (for each of its parts, where `f` was joined
        from several kernels: `joints` maps a joined path to theirs)."""
        for path in self.joints.get(f.path, (f.path,)):
            seen = self.record.setdefault(path, [])
            if rule not in seen:
                seen.append(rule)

    def note_all(self, values, rule: str) -> None:
        for v in values:
            if isinstance(v, Factored):
                self.note(v, rule)

    def iteration(self, index) -> Context:
        """The context of one loop iteration: the same records and warnings, and a
        dropout key folded with `index`, so each iteration draws its own masks."""
        if self.rng is None:
            return self
        return dataclasses.replace(self, rng=jax.random.fold_in(self.rng, index))

    def manual(self, rng, axes, vma_checked: bool) -> Context:
        """The context inside a `shard_map` body (manual over `axes`), whose dropout key
        `rng` came in as an operand: each mask is also folded with the index of every
        mesh axis its input varies over, which JAX tracks when `vma_checked`; without
        it, with the index along every manual axis (each shard its own mask)."""
        return dataclasses.replace(
            self,
            rng=rng,
            in_shard_map=True,
            manual_axes=frozenset(axes),
            vma_checked=vma_checked,
        )

    def dropout(self, x, f: Factored):
        """`x` with inverted dropout at rate `f.dropout`, if a key was given."""
        if self.rng is None or f.dropout == 0.0:
            return x
        site = self.sites.get(f.path, 0)
        self.sites[f.path] = site + 1
        key = jax.random.fold_in(path_key(self.rng, f.path), site)
        if self.in_shard_map:
            varying = compat.varying_axes(x) if self.vma_checked else None
            for axis in sorted(self.manual_axes if varying is None else varying, key=str):
                key = jax.random.fold_in(key, jax.lax.axis_index(axis))
        keep = jax.random.bernoulli(key, 1.0 - f.dropout, jnp.shape(x))
        kept = x * jnp.asarray(1.0 / (1.0 - f.dropout), x.dtype)
        return jnp.where(keep, kept, jnp.zeros((), x.dtype))

    def materialize(self, value, primitive: str, why: str = ""):
        """The dense kernel for an equation no rule handles; warns once, or raises. A
        quantized kernel without adapters (a `Deferred`, e.g. an output or a loop
        carry) is dequantized: nothing of an adapter is formed, so nothing warns."""
        if not isinstance(value, Factored):
            from jlora._quant import Deferred

            return value.value() if isinstance(value, Deferred) else value
        self.note(value, f"materialize:{primitive}")
        msg = (
            f"jlora: {value.path} flows into '{primitive}'"
            + (f" ({why})" if why else "")
            + ", which has no low-rank rule; W + scale*A@B is materialized for this "
            "equation only."
        )
        if self.strict:
            raise RuleError(msg + " (strict=True; drop strict to allow it.)")
        if (primitive, value.path) not in self.warned:
            self.warned.add((primitive, value.path))
            warnings.warn(msg, stacklevel=3)
        return value.materialize()

    def materialize_all(self, values, where: str) -> list:
        """Every `Factored` among `values` materialized (e.g. a loop carry, an output)."""
        return [self.materialize(v, where) for v in values]


def interpret(ctx: Context, jaxpr, consts, args) -> list[Any]:
    """Evaluates an open jaxpr whose inputs may be `Factored` values."""
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if compat.is_literal(v) else env[v]

    def write(v, val):
        env[v] = val

    for var, val in zip(jaxpr.constvars, consts):
        write(var, val)
    for var, val in zip(jaxpr.invars, args):
        write(var, val)
    last_used = compat.last_used(jaxpr)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        source, context = compat.equation_context(eqn)
        with source, context:
            if any(isinstance(v, Factored) for v in invals):
                name = compat.primitive_name(eqn)
                rule = ctx.rules.get(name)
                if rule is None:
                    outs = compat.bind(eqn, ctx.materialize_all(invals, name))
                else:
                    outs = rule(ctx, eqn, invals)
            else:
                outs = compat.bind(eqn, invals)
        for var, val in zip(eqn.outvars, outs):
            write(var, val)
        compat.drop_dead(eqn, env, last_used)
    return [read(v) for v in jaxpr.outvars]
