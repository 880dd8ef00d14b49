"""`wingspan models list` and `wingspan doctor`: the backbones, their offline weights, and
what each engine measures on this machine."""

from __future__ import annotations

from typing import Annotated

import typer

from wingspan.cli.app import app, models_app
from wingspan.cli.common import folded_table, out, plain
from wingspan.cli.options import DeviceOpt, Panel, Precision, Runtime
from wingspan.config import TrainConfig
from wingspan.errors import counted

T = TrainConfig  # defaults shown in --help come from the one config


@models_app.command("list")
def models_list() -> None:
    """Show the registered backbones and whether ImageNet weights are available offline here.

    Any other timm model name can be passed to --backbone too.
    """
    from wingspan.models import BACKBONES
    from wingspan.models.weights import find_offline

    table = folded_table("backbone", "timm model", "input", "unfreeze", "offline weights",
                         title="Backbones")
    for name, spec in BACKBONES.items():
        source = find_offline(spec)
        table.add_row(name, spec.timm_name, str(_input_size(spec.timm_name)), str(spec.unfreeze),
                      f"[green]yes ({source})[/]" if source else "[yellow]no[/]")
        if not source:  # said for the backbones that lack them, not for every table
            table.caption = ("A backbone without offline weights: pass --weights PATH, or "
                             "run once with a network (the download is cached).")
    out.print(table)


def _input_size(timm_name: str) -> int:
    import timm

    return timm.models.get_pretrained_cfg(timm_name).input_size[-1]


@app.command("doctor")
def doctor_command(
    backbone: Annotated[str, typer.Option(help="The backbone to time the engines on.",
                                          rich_help_panel=Panel.MODEL)]
    = T.backbone,
    image_size: Annotated[int | None, typer.Option(
        min=16, help="Input size (default: the backbone's).", rich_help_panel=Panel.MODEL)] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size the runs will use.",
                                            rich_help_panel=Panel.ENGINES)]
    = T.batch_size,
    device: DeviceOpt = T.device,
    precision: Precision = T.precision,
    runtime: Runtime = T.runtime,
    train_step: Annotated[bool, typer.Option(
        "--train-step/--no-train-step", help="Also time the fine-tuning step.",
        rich_help_panel=Panel.ENGINES)] = True,
) -> None:
    """Show this machine, what every engine measures on it for a backbone, what `auto`
    picks (and stores for later runs), and which ImageNet weights are here offline.

    Run it first when something is slow. It measures afresh and updates the cached choice.
    """
    from wingspan.doctor import diagnose
    from wingspan.progress import status

    with status(f"Timing every engine on {backbone}..."):  # (drawn where a bar would be)
        d = diagnose(backbone, image_size, batch_size, device, precision, runtime, train_step)
    m = d.machine
    table = folded_table(show_header=False, title="Machine", title_justify="left", box=None)
    of = f" of the machine's {m['machine_cores']}" if m["machine_cores"] != m["cores"] else ""
    table.add_row("CPU", f"{m['cpu']}, {m['cores']} cores{of}; torch uses "
                  f"{counted(m['torch_threads'], 'thread')}")
    table.add_row("ISA", f"{m['isa']} (torch kernels: {m['torch_isa']})")
    table.add_row("bf16 on the CPU", "native" if m["cpu_bf16"] else
                  "emulated (no AMX / AVX-512 bf16): not a candidate unless forced")
    table.add_row("CUDA", ", ".join(m["cuda"]) or "no GPU")
    table.add_row("versions", ", ".join(f"{k} {v}" for k, v in m["versions"].items())
                  + f", python {m['python']}")
    out.print(table)
    policy = d.policy
    for title, choice, engines, left_out in (
            ("Frozen passes (feature cache, validation, evaluate, predict)", policy.frozen,
             policy.frozen_candidates, policy.left_out),
            ("Training step (fine-tuning the default stages)", policy.train,
             policy.train_candidates, policy.train_left_out)):
        if choice is None or (not train_step and choice is policy.train):  # not timed
            continue
        t = folded_table("engine", "images/s", "vs torch-fp32", "images changed", "choice",
                         title=f"{title}: {d.backbone} at {d.size} px, batch {d.batch_size}",
                         title_justify="left")
        fp32 = choice.images_per_s.get("torch-fp32")
        for e in engines:
            speed = choice.images_per_s.get(e.name)
            status = ("[green]picked[/]" if e == choice.engine and len(engines) > 1 else
                      "[green]only candidate[/]" if e == choice.engine else
                      f"[yellow]rejected: {choice.rejected[e.name]}[/]"
                      if e.name in choice.rejected else "")
            change = choice.changed.get(e.name)
            t.add_row(e.name, f"{speed:.1f}" if speed else "-",
                      f"{speed / fp32:.2f}x" if speed and fp32 else "-",
                      f"{change:.0%}" if change is not None else "-", status)
        for name, why in left_out.items():
            t.add_row(f"[dim]{name}[/]", "-", "-", "-", f"[dim]not a candidate: {why}[/]")
        out.print(t)
    out.print(f"Picked: {policy.describe()}")
    forced = [f"--{k} {v}" for k, v in (("precision", precision), ("runtime", runtime))
              if v != "auto"]
    from wingspan.models.engine import NOT_KEPT

    runs = (f"runs of {d.backbone} at {d.size} px, batch {d.batch_size}, with "
            f"{counted(m['torch_threads'], 'thread')}"
            + (f" and {' '.join(forced)}" if forced else "") + " on this machine")
    shared = [c for c in (policy.frozen, policy.train if train_step else None)
              if c and c.cores_shared]
    stays = [c.stays for c in shared if c.stays]
    if NOT_KEPT:
        kept = f"Not kept (the cache cannot be written, see above): {runs} time the engines again."
    elif shared:
        kept = (f"Not kept: other work held the cores while it timed (its threads waited "
                f"{max(c.core_wait for c in shared):.0%} of the time), so the figures say more "
                "of that load than of the engines; "
                + (f"{runs} keep the choice stored before ({'; '.join(stays)})" if stays
                   else f"{runs} time them again") + ". Run doctor when the machine is quieter.")
    else:
        kept = f"Kept in {plain(d.cache)}: {runs} use it without timing again."
    out.print(f"{kept} Timed with weights: {d.weights}.")
    weights = folded_table("backbone", "ImageNet weights offline", title="Offline weights",
                           title_justify="left")
    for name, source in d.offline_weights.items():
        weights.add_row(name, f"[green]{source}[/]" if source else "[yellow]no[/] (--weights "
                        "PATH, or one run with a network)")
    out.print(weights)
    from wingspan.config import default_cache_dir
    from wingspan.doctor import CACHE_PARTS, human_bytes

    use = folded_table("in the cache", "size", "files", "what", title=(
        f"Cache: {plain(str(default_cache_dir()))}, "
        f"{human_bytes(sum(size for _, size, _ in d.cache_use))}"), title_justify="left")
    for name, size, files in d.cache_use:
        use.add_row(name, human_bytes(size), str(files), next(
            (what for part, what in CACHE_PARTS.items() if name.startswith(part)), ""))
    out.print(use)
    if not d.cache_writable:
        out.print("[yellow]The cache folder cannot be written[/]: nothing is kept, and every "
                  "run decodes the images, exports the graphs, computes the features and "
                  "times the engines again. Set $WINGSPAN_CACHE to a folder you may write.")
    out.print("All of it but datasets/ (downloads) is safe to delete at any time: runs then "
              "decode the images, export the graphs, compute the features and time the "
              "engines again. "
              "$WINGSPAN_CACHE puts it elsewhere.")
