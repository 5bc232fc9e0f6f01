"""One sampling run: what does not change while it runs (`RunContext`), the little that does (`RunState`),
and what one model evaluation of the sampler shares between its calls (`Evaluation`)."""
from __future__ import annotations

import contextvars
from dataclasses import dataclass, field, replace


import comfy.samplers

from ...sampling import MergeRule
from ...sampling.sync import locate, noise_level, same_sigma
from .conds import WindowConds
from .memory import automatic_batch
from .model_facts import layout_for, parameterisation
from .model_patches import WindowPatches
from .positions import window_options

# the run under way (its OUTER_SAMPLE wrapper sets it), and a call that evaluates only some regions
current_run: contextvars.ContextVar["RunState | None"] = contextvars.ContextVar("controlsync_run", default=None)
current_focus: contextvars.ContextVar["Focus | None"] = contextvars.ContextVar("controlsync_focus", default=None)

# guiders whose math is per sample, so gradient passes may stack windows (PerpNeg projects over the batch)
_PER_SAMPLE_GUIDERS = ("CFGGuider", "Guider_Basic", "Guider_DualCFG")


@dataclass(frozen=True)
class RunContext:
    config: object               # WindowedConfig
    plan: object                 # RegionPlan laid out on this run's latent (one region when focused)
    merge: MergeRule
    model: object                # the BaseModel (per-window model conds are computed with it)
    guider: object = None        # the CFGGuider sampling (None: a call outside a sampling run)
    parameterisation: str = "ve"  # the space AnchorSync steps in (sampling/sync.py)
    step_weights: tuple = ()     # AnchorSync's w_t for every sampler step (empty: no sync)
    sigmas: tuple = ()           # the run's schedule
    seed: int | None = None

    @property
    def synced(self) -> bool:
        return any(w > 0 for w in self.step_weights)


class Key:
    """A key made of objects compared by identity, holding them alive: an id() of a freed object can be
    reused by the next one (a guidance's per-call options dict), a held object's cannot."""
    __slots__ = ("objects",)

    def __init__(self, *objects):
        self.objects = objects

    def __hash__(self):
        return hash(tuple(id(o) for o in self.objects))

    def __eq__(self, other):
        return len(self.objects) == len(other.objects) and all(a is b for a, b in zip(self.objects, other.objects))


@dataclass
class Evaluation:
    """What one model evaluation of the sampler shares between its calls."""
    index: int
    sync: object = None               # SyncMoves of a synced evaluation
    outputs: dict = field(default_factory=dict)  # Key(kind, options, *conds) -> canvas outputs / {region: outputs}
    correction: object = None         # Reconstruction's correction of the denoised outputs
    calls: int = 0


@dataclass(frozen=True)
class Focus:
    """A call that evaluates only some regions (gradient passes, the anchor, a focused window) at the given
    latents, handing back outputs the evaluation already recorded for them; `record` keeps new ones."""
    run: "RunState"
    regions: tuple
    record: bool = False
    reuse: bool = True


class RunState:
    """The mutable part of a run: evaluation counter, per-window conds and ControlNet copies, batch sizes
    (chosen once), the observations the run keeps (known pixels, a low-pass guide), and the canvas move a synced evaluation hands the
    sampler (applied to its own x by the step tracker, nodes/bridge/steps.py)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.conds = WindowConds(ctx.plan, ctx.model)
        self.patches = WindowPatches(ctx.plan)
        self.observations = ()       # conditioning observations kept this run (observations.py)
        self.evaluations = 0         # model evaluations the sampler made so far
        self.tracked = False         # counted at the sampler (else: each outermost call is one evaluation)
        self.depth = 0               # canvas passes under way (nested guider calls)
        self.first_evals: dict[int, int] = {}  # evaluation number -> sampler step it starts (synced runs)
        self.evaluation: Evaluation | None = None
        self.pending_move = None     # the canvas move of the evaluation under way, for the sampler's x
        self.denoise_batch = None    # regions per denoising call, chosen at the first call
        self.gradient_batch = None   # windows per gradient graph, chosen at the first gradient pass

    def current_evaluation(self) -> Evaluation:
        if self.evaluation is None or self.evaluation.index != self.evaluations:
            self.evaluation = Evaluation(self.evaluations)
        return self.evaluation

    def sync_step(self, timestep) -> tuple[float, float] | None:
        """(w_t, sigma) when the current evaluation starts a synced step, else None."""
        step = self.first_evals.get(self.evaluations - 1)
        if step is None or self.ctx.step_weights[step] == 0.0:
            return None
        return self.ctx.step_weights[step], float(timestep.flatten()[0])

    def roles(self, conds) -> list:
        """What each cond list is to the guider ('positive', 'negative', 'middle', ...), by identity with
        the guider's own conds; without a guider (a call outside a run), positive then negative."""
        named = {id(v): k for k, v in (getattr(self.ctx.guider, "conds", None) or {}).items()}
        if not named:
            return ["positive", "negative"][:len(conds)] + [None] * max(0, len(conds) - 2)
        return [named.get(id(c)) for c in conds]

    def crop_conds(self, conds, batch, B, device=None) -> list:
        """The conds cut to these regions; ControlNets as their instances for `device` (MultiGPU: devices.py)."""
        return [None if c is None else self.conds.crop(c, batch, B, role, device) for c, role in zip(conds, self.roles(conds))]

    def crop_options(self, model_options, batch, B) -> dict:
        """The model options of a call on these regions: the MODEL's spatial model patches cut to them, and
        their canvas positions when the plan asks for them."""
        return window_options(self.patches.options(model_options, batch, B), self.ctx.plan, batch, self.ctx.model)

    def denoise_batch_size(self, model, conds, x_in) -> int:
        if self.denoise_batch is None:
            size = self.ctx.config.window_batch
            if has_area(conds):
                size = 1  # area conds are intersected with each window, so windows differ in their conds
            elif size <= 0:
                size = automatic_batch(model, self.ctx.plan, conds, x_in)
            self.denoise_batch = max(1, size)
        return self.denoise_batch

    def gradient_batch_size(self, model, conds, x_in, loss_bytes_per_pixel=None) -> int:
        """Windows per gradient graph, chosen at the first gradient pass (after the loss's decoder and LPIPS
        are loaded, so free memory counts them). Only guiders whose math is per sample may stack windows."""
        if self.gradient_batch is None:
            size = self.ctx.config.window_batch
            if type(self.ctx.guider).__name__ not in _PER_SAMPLE_GUIDERS or has_area(conds):
                size = 1
            elif size <= 0:
                size = automatic_batch(model, self.ctx.plan, conds, x_in, gradient=True,
                                       loss_bytes_per_pixel=loss_bytes_per_pixel)
            self.gradient_batch = max(1, size)
        return self.gradient_batch

    def close(self):
        self.conds.close()
        self.patches.close()


def has_area(conds) -> bool:
    return any(c is not None and any("area" in d for d in c) for c in conds)


def run_context(config, guider, latent_shape, sigmas, seed) -> RunContext:
    patcher = guider.model_patcher
    plan = focused_layout(config, patcher, latent_shape)
    weights = ()
    if config.sync is not None and config.focus is None and len(plan.regions) > 1:
        model_sampling = patcher.get_model_object("model_sampling")
        schedule = [float(s) for s in sigmas]
        # counted from the run, the steps are a whole schedule of their own: no search for where they come from
        position = config.schedule_position or (None if config.sync.schedule.start == "run" else
                                                locate(schedule, whole_schedules(model_sampling, schedule)))
        weights = tuple(config.sync.schedule.step_weights(
            schedule, lambda s: noise_level(s, model_sampling.percent_to_sigma), position))
    kind = parameterisation(patcher) if weights else "ve"
    return RunContext(config, plan, MergeRule(plan), patcher.model, guider, kind, weights,
                      tuple(float(s) for s in sigmas), seed)


# the longest whole schedule a split or cut schedule is looked for in
_LONGEST_SCHEDULE = 1000


def whole_schedules(model_sampling, sigmas: list[float]):
    """ComfyUI's schedulers' whole schedules that may hold `sigmas` as consecutive points: the sigmas' own
    length, then for a schedule that starts at a scheduler's top (the high half of a split) the length whose
    second point is the sigmas' second, and for one that ends at its end (the low half, KSampler's denoise) the
    length whose point `steps` from the end is the sigmas' first - each found by bisection over the length."""
    steps = len(sigmas) - 1
    # sgm_uniform's N steps are normal's first N of N + 1: a high half of either fits both, and normal is the
    # one users pick more often, so it is tried first
    names = sorted(comfy.samplers.SCHEDULER_NAMES, key=lambda n: n == "sgm_uniform")
    for name in names:
        def whole(total, name=name):
            try:
                return comfy.samplers.calculate_sigmas(model_sampling, name, total).float().tolist()
            except Exception:  # a scheduler that cannot make this many steps for this model
                return None
        own = whole(steps)
        if own is None:
            continue
        yield own
        if steps < 1:
            continue
        if same_sigma(own[0], sigmas[0]):
            yield from _by_bisection(whole, lambda w: w[1], sigmas[1], steps)
        if same_sigma(own[-1], sigmas[-1]):
            yield from _by_bisection(whole, lambda w: w[len(w) - 1 - steps] if len(w) > steps else None, sigmas[0], steps)


def _by_bisection(whole, key, target, steps):
    """Whole schedules of lengths around the one whose `key` is `target`, for a key that moves one way with the
    length."""
    lo, hi = steps, _LONGEST_SCHEDULE
    k_lo, k_hi = _key(whole, key, lo), _key(whole, key, hi)
    if k_lo is None or k_hi is None or not min(k_lo, k_hi) - 1e-6 <= target <= max(k_lo, k_hi) + 1e-6:
        return
    rising = k_hi > k_lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        k = _key(whole, key, mid)
        if k is None:
            return
        if (k < target) == rising:
            lo = mid
        else:
            hi = mid
    for total in range(max(steps, lo - 2), min(_LONGEST_SCHEDULE, hi + 2) + 1):  # keys that move in jumps
        found = whole(total)
        if found is not None:
            yield found


def _key(whole, key, total):
    found = whole(total)
    return None if found is None else key(found)


def focused_layout(config, model, latent_shape):
    focus = config.focus
    if focus is None:
        return layout_for(config.plan, model, latent_shape)
    # the latent is one region of a larger canvas: conds are cropped from that canvas
    full = layout_for(config.plan, model, focus[0])
    i = focus[1]
    plan = replace(full, regions=(full.regions[i],), coefficients=(1.0,), anchor=0, factors_of=(),
                   prompts=(full.prompts[i],) if full.prompts else (), pooled=(full.pooled[i],) if full.pooled else ())
    if tuple(latent_shape[-2:]) != plan.regions[0].size:
        raise ValueError(f"latent_image: {tuple(latent_shape[-2:])} is not the size of the window it samples")
    return plan
