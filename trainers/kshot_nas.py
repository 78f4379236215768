"""K-shot NAS: learnable weight sharing with K supernets (Su, You, Zheng, Wang, Qian, Zhang, Xu; ICML 2021).

Spec: ../shared/papers/methods_nas_gen_llm.md section 3. There is no public official code: the formulation below is
the abstract's; every detail the abstract does not give is marked [recalled] (from the paper, not verified),
[3rd] (a public third-party reimplementation, not the authors') or [ours] (a choice of this file).

K supernets Theta^(1..K) of one search space (trainers/nas: `space`). Every parameter of every module of the space
(stem, each candidate operation of each searchable position, tail, and the linear head) is a dictionary of K tensors
("atoms"), stored as one parameter theta of shape (K, *shape). A path alpha (an architecture code) runs with

    W(alpha)      = sum_k lambda_k(alpha) Theta^(k)            for every parameter of the path's modules
    lambda(alpha) = softmax(pi(enc(alpha), width(alpha)) / tau)                      in the simplex Delta^(K-1)

formed once per forward (one weighted sum per parameter, O(K |W|)), after which the path's stand-alone modules run
once with W (torch.func.functional_call): never K forward passes. Batch-norm running statistics are buffers of the
stand-alone modules, one copy shared by the K supernets. `atom_init` "copies" (the default): all K atoms start
identical, so the supernets start as one one-shot supernet, and with uniform codes (lambda = 1/K) each atom receives
g/K and they stay identical: K = 1 is single-path one-shot (SPOS) weight sharing exactly. While the atoms are equal,
the loss's gradient with respect to every lambda_k is the same too, so after the warm-up the supernets separate only
through the codes' differences. "independent": each supernet is the space's own, separately initialised modules
(K draws of `supernet_parts`), so the atoms differ from the start (with uniform codes a path's weights are the mean of
K draws: their spread is 1/sqrt(K) of one draw's). The paper does not say which (its warm-up, as recalled, "equals K
identical one-shot supernets", which suggests copies); benchmarks/ranking.py compares the two.

Simplex-net pi [abstract; recalled: a 2-layer MLP with temperature tau]: enc(alpha) is the one-hot option of every
position, concatenated (sum(choices),); the channel branch [3rd: Liner's review] is a second 2-layer MLP on the width
encoding width(alpha) (positions,), whose logits are added to the first one's. The width of a candidate module is
defined generically from the module [ours]: the largest out_channels among its convolutions except the last one (the
last one makes the layer's output), divided by that last convolution's out_channels; a module with fewer than two
convolutions (identity, the 1x1 projection of a shape-changing identity, a left-out skip) has width 0. In
macro_digits an inverted residual of expansion e has width e * c_in / c_out (3 or 1.5 for e = 3). In the spaces here
the width is a function of the option, so the branch adds no new information but an ordered, shared input (how wide
an operation is) to the code.

Channel regulariser [3rd: "a non-parametric regularisation term pushes apart the codes of different widths"; the
exact form is our reading]. On a simplex step with path alpha, a second path beta is drawn; the code of alpha's
options with beta's widths, lambda' = softmax(pi(enc(alpha), width(beta)) / tau), is pushed away from lambda(alpha):

    R = - width_reg * || lambda(alpha) - lambda' ||^2              (no learnable parameters; 0 when the widths agree)

Training [abstract; recalled details]: warm-up with uniform codes for `warmup_steps` (the K supernets learn, pi is
not used); then the steps alternate: every `simplex_every`-th step after the warm-up is a simplex step, which trains
pi with the atoms detached (cross-entropy + R), the other steps train the atoms with lambda detached (cross-entropy).
Each step trains one path drawn uniformly from the space by trainers.nas.supernet.path_rng(step): the same path on
every rank and after a resume. Both kinds of step use the training batch ([ours]: the paper's split for pi, if any,
is not known). Whether pi has been trained is the buffer `pi_active` (set in on_step_end), so a loaded supernet still
in warm-up gives uniform codes at search time too.

Paper symbol -> Config field:
    search space (the paper: a MobileNetV2-like ImageNet space, as GreedyNAS) -> space
    K                                   (default 4 [ours]: the paper ablates K) -> k
    pi's hidden width                 (100 [3rd]; the paper's is not verified) -> simplex_hidden
    tau                                                               (1 [ours]) -> tau
    warm-up with uniform codes            (recalled; the length is [ours]) -> warmup_steps
    alternation of the supernet and pi updates       (4 : 1 after the warm-up [ours]) -> simplex_every
    weight of the channel regulariser                               (0.1 [ours]) -> width_reg
    pi's learning rate relative to the supernets'              (0.1 [ours]) -> simplex_lr_scale
Why pi learns slowly and seldom (simplex_every 5, simplex_lr_scale 0.1): with pi trained every second step at the
supernets' lr, the codes collapse on digits. Whichever supernet the first simplex steps favour gets most of the
gradient and improves, so pi favours it more: after 2000 steps every one of the 81 paths had lambda_max > 0.99 on
the same supernet (mean code entropy 0.007), which is one-shot weight sharing with extra parameters (Kendall tau
0.582 against one-shot's 0.595, seed 0 of benchmarks/ranking.py). With 1 simplex step in 5 at 0.1 x lr, the codes
stay spread (mean entropy 1.11 of ln 4 = 1.39; the paths' favourite supernets 29 / 24 / 27 / 1) and tau was 0.640.
A larger tau (5) with 1 step in 5 also kept them spread (entropy 1.35, tau 0.640).

The optimizer is the experiment's `optim:` block (one optimizer for atoms and pi [ours]). `param_groups` gives the
atoms lr_scale K: with uniform codes each atom receives g/K, so the path weights then move as a one-shot supernet's
under SGD (without weight decay the warm-up then trains exactly the one-shot supernet's weights: the tests check it).
Weight decay is not rescaled (a group cannot know the experiment's value): with SGD the path weights decay K times
faster than a one-shot supernet's, so the experiment files set optim.weight_decay to the one-shot value / K. Under
AdamW lr_scale K would make the path weights' steps about K times larger (Adam normalises the g/K away). Like the
orchestrator's default groups, 1-d parameters (an atom of a bias or a norm: theta of shape (K, C)) get no weight decay
and skip LARS; under LARS the trust ratio of an atom tensor is computed over its K atoms together.

Deviations from the (unknown) official code, and where the third-party reimplementation differs: it adds the channel
branch at the hidden layer (before the ReLU) and has no temperature; it mixes only the searchable layers' weights,
where here the stem, tail and head follow the dictionary too (the task's choice: every parameter of the network).
The linear head is initialised as torch's nn.Linear in every space (GeniusMobileNet.build initialises it as timm).
Evaluation (`eval_step`) is a monitor only: the accuracy of the all-largest and all-smallest option paths with the
training batch-norm statistics; ranking paths recalibrates BN per path (trainers/nas/supernet.py, path_eval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from trainers._common.contract import Batch, ConfigError, DataInfo, TrainerSpec
from trainers.nas import SPACES, get_space
from trainers.nas.space import SearchSpace
from trainers.nas.supernet import Supernet, path_rng


@dataclass
class Config:
    """The paper's ImageNet supernet on the MobileNet-like space; values marked in the module docstring."""

    space: str = "genius_mobilenet"  # a trainers.nas space with `supernet_parts` (macro_digits on CPU)
    k: int = 4  # K supernets; 1 is the one-shot (SPOS) baseline
    simplex_hidden: int = 100  # hidden width of pi's two MLP branches
    tau: float = 1.0  # temperature of the softmax that makes the simplex code
    warmup_steps: int = 25020  # steps with uniform codes lambda = 1/K (20 epochs at batch 1024 on ImageNet [ours])
    simplex_every: int = 5  # after the warm-up every simplex_every-th step trains pi, the others the K supernets
    width_reg: float = 0.1  # weight of the channel regulariser R (pushes apart codes of different widths)
    simplex_lr_scale: float = 0.1  # pi's learning rate relative to the experiment's lr
    atom_init: Literal["copies", "independent"] = "copies"  # the K supernets' start: one draw copied, or K draws


TINY = Config(space="macro_digits", k=2, simplex_hidden=8, warmup_steps=2, simplex_every=2)

REFERENCE_PATHS = ("largest", "smallest")  # eval_step's monitor paths: the last / first option everywhere


# ---------------------------------------------------------------------------------------------- pure functions


def convex_combination(lam: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """sum_k lam_k theta_k: lam (K,), theta (K, *shape) -> (*shape). A broadcast product and a sum, not a matmul, so
    that under autocast the weight stays in the atoms' precision (the layer casts it as it would its own)."""
    return (lam.view(-1, *([1] * (theta.ndim - 1))) * theta).sum(0)


def code_entropy(lam: torch.Tensor) -> torch.Tensor:
    """-sum_k lam_k log lam_k of a simplex code (K,); log K when uniform, 0 when one-hot."""
    return -(lam * lam.clamp_min(1e-12).log()).sum()


def width_regulariser(lam: torch.Tensor, lam_other: torch.Tensor, weight: float) -> torch.Tensor:
    """R = -weight * ||lam - lam_other||^2 for two codes (K,): lower the further apart they are."""
    return -weight * (lam - lam_other).pow(2).sum()


def module_width(module: nn.Module) -> float:
    """Hidden width of a candidate relative to its output: the widest conv but the last, over the last conv's
    out_channels; 0 with fewer than two convs (module docstring)."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if len(convs) < 2:
        return 0.0
    return max(c.out_channels for c in convs[:-1]) / convs[-1].out_channels


def is_simplex_step(step: int, cfg: Config) -> bool:
    """Whether step `step` (0-based) trains pi: after the warm-up, every simplex_every-th step (never for K = 1)."""
    after = step - cfg.warmup_steps
    return cfg.k > 1 and after >= 0 and after % cfg.simplex_every == cfg.simplex_every - 1


# ---------------------------------------------------------------------------------------------- networks


class Dictionary(nn.Module):
    """One stand-alone module whose every parameter is a dictionary of K atoms, `theta[name]` (K, *shape), atom k
    from the k-th of `draws` (K modules of one architecture; the same module K times for identical atoms); its
    buffers (BN statistics) stay the first module's, one copy for the K supernets."""

    def __init__(self, draws: list[nn.Module]):
        super().__init__()
        module = draws[0]
        self.names = [name for name, _ in module.named_parameters()]
        params = [dict(draw.named_parameters()) for draw in draws]
        self.theta = nn.ParameterDict([(_key(name), nn.Parameter(torch.stack([p[name].detach() for p in params])))
                                       for name in self.names])  # (K, *shape) each, in the module's order
        for sub in module.modules():  # the module keeps no weights of its own: functional_call gives them
            for name in list(sub._parameters):
                sub.register_parameter(name, None)
        self.module = module

    def weights(self, lam: torch.Tensor, train_atoms: bool = True) -> dict[str, torch.Tensor]:
        """The path's parameters W = sum_k lam_k theta_k; the atoms detached unless `train_atoms`."""
        atoms = {name: self.theta[_key(name)] for name in self.names}  # (K, *shape) each
        return {name: convex_combination(lam, theta if train_atoms else theta.detach())
                for name, theta in atoms.items()}

    def forward(self, x: torch.Tensor, lam: torch.Tensor, train_atoms: bool = True) -> torch.Tensor:
        return functional_call(self.module, self.weights(lam, train_atoms), (x,))


def _key(name: str) -> str:
    return name.replace(".", "-")  # a ParameterDict key cannot hold "."


class SimplexNet(nn.Module):
    """pi: logits = MLP(enc) + MLP_channel(width), each Linear-ReLU-Linear; lambda = softmax(logits / tau)."""

    def __init__(self, arch_dim: int, width_dim: int, hidden: int, k: int):
        super().__init__()
        self.arch = nn.Sequential(nn.Linear(arch_dim, hidden), nn.ReLU(), nn.Linear(hidden, k))
        self.channel = nn.Sequential(nn.Linear(width_dim, hidden), nn.ReLU(), nn.Linear(hidden, k))

    def forward(self, enc: torch.Tensor, width: torch.Tensor, tau: float) -> torch.Tensor:  # (A,), (P,) -> (K,)
        return torch.softmax((self.arch(enc) + self.channel(width)) / tau, dim=-1)


def supernet_draw(space: SearchSpace, num_classes: int, in_channels: int
                  ) -> tuple[nn.Module, list[list[nn.Module]], nn.Module, nn.Linear]:
    """One initialisation of the space's stand-alone modules: stem, candidates (position -> option), tail, head."""
    stem, candidates, tail, num_features = space.supernet_parts(num_classes, in_channels)
    return stem, candidates, tail, nn.Linear(num_features, num_classes)


class KShotSupernet(Supernet):
    """K supernets of `space` as dictionaries, and the simplex-net `pi` (None for K = 1)."""

    method = "kshot_nas"

    def __init__(self, space: SearchSpace, cfg: Config, num_classes: int, in_channels: int):
        super().__init__(space, cfg)
        draws = [supernet_draw(space, num_classes, in_channels)
                 for _ in range(cfg.k if cfg.atom_init == "independent" else 1)]
        stems, candidates, tails, heads = zip(*draws * (cfg.k // len(draws)))  # K of each (one module K times: copies)
        self.widths = [[module_width(m) for m in row] for row in candidates[0]]  # position -> option -> width
        self.stem, self.tail, self.head = Dictionary(stems), Dictionary(tails), Dictionary(heads)
        self.candidates = nn.ModuleList(nn.ModuleList(Dictionary([c[i][j] for c in candidates])
                                                      for j in range(len(row))) for i, row in enumerate(candidates[0]))
        self.pi = SimplexNet(sum(space.choices), len(space.choices), cfg.simplex_hidden, cfg.k) if cfg.k > 1 else None
        self.register_buffer("pi_active", torch.tensor(cfg.warmup_steps == 0))  # False: uniform codes (warm-up)

    def dictionaries(self) -> list[Dictionary]:
        return [m for m in self.modules() if isinstance(m, Dictionary)]

    def uniform_code(self) -> torch.Tensor:  # (K,)
        return torch.full((self.cfg.k,), 1.0 / self.cfg.k, device=self.pi_active.device)

    def width_encoding(self, options: tuple[int, ...]) -> torch.Tensor:  # (positions,)
        return torch.tensor([row[o] for row, o in zip(self.widths, options)], device=self.pi_active.device)

    def simplex_code(self, options: tuple[int, ...], width: torch.Tensor | None = None) -> torch.Tensor:
        """lambda of the path `options` by pi, with the path's own widths unless `width` (positions,) is given."""
        enc = torch.cat([F.one_hot(torch.tensor(o), n) for o, n in zip(options, self.space.choices)]).float()
        width = self.width_encoding(options) if width is None else width
        return self.pi(enc.to(width.device), width, self.cfg.tau)

    def code(self, options: tuple[int, ...]) -> torch.Tensor:
        """The code a path runs with outside training: pi's once it has been trained, else uniform."""
        return self.simplex_code(options) if self.pi is not None and bool(self.pi_active) else self.uniform_code()

    def path(self, x: torch.Tensor, options: tuple[int, ...], lam: torch.Tensor,
             train_atoms: bool = True) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        x = self.stem(x, lam, train_atoms)
        for row, option in zip(self.candidates, options):
            x = row[option](x, lam, train_atoms)
        return self.head(self.tail(x, lam, train_atoms), lam, train_atoms)

    def forward(self, x: torch.Tensor, code: str) -> torch.Tensor:  # (B, C, H, W) -> (B, classes)
        options = self.space.decode(code)
        return self.path(x, options, self.code(options))


# ---------------------------------------------------------------------------------------------- the step contract


def build(cfg: Config, info: DataInfo) -> KShotSupernet:
    return KShotSupernet(get_space(cfg.space), cfg, info.num_classes, info.in_channels)


def check(cfg: Config) -> None:
    if cfg.space not in SPACES or not hasattr(get_space(cfg.space), "supernet_parts"):
        raise ConfigError("space", "a search space with supernet_parts (macro_digits, nas_bench_macro, "
                          "genius_mobilenet...)", cfg.space)
    for field in ("k", "simplex_hidden", "simplex_every"):
        if getattr(cfg, field) < 1:
            raise ConfigError(field, "an integer >= 1", getattr(cfg, field))
    if cfg.tau <= 0:
        raise ConfigError("tau", "a temperature > 0", cfg.tau)
    if cfg.warmup_steps < 0:
        raise ConfigError("warmup_steps", "an integer >= 0", cfg.warmup_steps)
    if cfg.width_reg < 0:
        raise ConfigError("width_reg", "a weight >= 0", cfg.width_reg)
    if cfg.atom_init not in ("copies", "independent"):
        raise ConfigError("atom_init", "copies or independent", cfg.atom_init)


def train_step(model: KShotSupernet, batch: Batch, cfg: Config, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
    options = model.space.decode(model.space.sample(path_rng(step)))
    simplex = is_simplex_step(step, cfg)
    if step < cfg.warmup_steps or model.pi is None:
        lam = model.uniform_code()
    else:
        lam = model.simplex_code(options) if simplex else model.simplex_code(options).detach()
    logits = model.path(batch["x"], options, lam, train_atoms=not simplex)  # (B, classes)
    ce = F.cross_entropy(logits, batch["y"])
    reg = channel_regulariser(model, options, lam, cfg, step) if simplex else torch.zeros_like(ce)
    metrics = {"ce": ce.detach(), "acc": (logits.argmax(1) == batch["y"]).float().mean(), "width_reg": reg.detach(),
               "code_entropy": code_entropy(lam.detach()), "code_max": lam.detach().max(),
               "simplex_step": torch.tensor(float(simplex))}
    return ce + reg, metrics


def channel_regulariser(model: KShotSupernet, options: tuple[int, ...], lam: torch.Tensor, cfg: Config,
                        step: int) -> torch.Tensor:
    """R of the module docstring: the path's code against its options with another path's widths (drawn from the
    step, as the path)."""
    other = model.space.decode(model.space.sample(path_rng(step, salt="width")))
    return width_regulariser(lam, model.simplex_code(options, model.width_encoding(other)), cfg.width_reg)


def on_step_end(model: KShotSupernet, cfg: Config, step: int) -> None:
    """`step` optimizer steps are done: pi gives the codes from the first step after the warm-up on."""
    model.pi_active.fill_(step >= cfg.warmup_steps)


def reference_codes(space: SearchSpace) -> dict[str, str]:
    """The monitor paths of eval_step: every position's last option ("largest") and first option ("smallest")."""
    return {"largest": space.encode([n - 1 for n in space.choices]), "smallest": space.encode([0] * len(space.choices))}


def eval_step(model: KShotSupernet, batch: Batch, cfg: Config) -> dict[str, torch.Tensor]:
    """Correct predictions of each reference path with the training BN statistics (a monitor, not a ranking)."""
    y = batch["y"]
    sums = {f"acc_{name}": (model(batch["x"], code).argmax(1) == y).sum()
            for name, code in reference_codes(model.space).items()}
    return {**sums, "n": torch.tensor(y.numel(), device=y.device)}


def param_groups(model: KShotSupernet, cfg: Config) -> list[dict[str, Any]]:
    """pi (lr_scale simplex_lr_scale), then the atoms (lr_scale K); weight decay only on parameters of rank >= 2
    (an atom tensor has one more dimension than the parameter it stands for)."""
    atoms = [theta for d in model.dictionaries() for theta in d.theta.values()]
    groups = []
    if model.pi is not None:
        pi = list(model.pi.parameters())
        groups += [{"params": [p for p in pi if p.ndim >= 2], "lr_scale": cfg.simplex_lr_scale},
                   {"params": [p for p in pi if p.ndim < 2], "lr_scale": cfg.simplex_lr_scale, "weight_decay": 0.0,
                    "lars_exclude": True}]
    groups += [{"params": [p for p in atoms if p.ndim >= 3], "lr_scale": float(cfg.k)},
               {"params": [p for p in atoms if p.ndim < 3], "lr_scale": float(cfg.k), "weight_decay": 0.0,
                "lars_exclude": True}]
    return [g for g in groups if g["params"]]


SPEC = TrainerSpec(
    name="kshot_nas",
    paper="K-shot NAS: Learnable Weight-Sharing for NAS with K-shot Supernets (ICML 2021)",
    Config=Config,
    TINY=TINY,
    build=build,
    train_step=train_step,
    eval_step=eval_step,
    on_step_end=on_step_end,
    param_groups=param_groups,
    check=check,
    dynamic_graph=True,
)
