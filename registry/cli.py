"""``crispedit registry ...``: log, show, diff, alias, rollback, revert, export, verify, prune, gc (and create)."""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict

from crispedit.models import crispedit_home
from registry.export import export_version
from registry.integrity import gc, verify
from registry.store import Registry


def print_json(value) -> None:
    print(json.dumps(value, indent=2, default=str))


def cmd(args: argparse.Namespace) -> None:
    reg = Registry(args.root)
    action = args.action
    if action == "create":
        from crispedit.models import load_model, model_fingerprint

        model, _ = load_model(args.base, device="cpu")
        print_json(asdict(reg.create_model(args.model, args.base, model_fingerprint(model), author=args.author)))
    elif action == "log":
        aliases = reg.aliases(args.model)
        for v in reg.versions(args.model)[::-1]:
            tags = ",".join(a for a, t in aliases.items() if t == v.id)
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at))
            drift = (v.metrics or {}).get("kl_base")
            print(f"{v.id:>5} <- {v.parent or '-':<5} {when} {v.method or '-':<9} {len(v.edits):>4} edits"
                  + (f"  KL from v0 {drift:.4f}" if drift is not None else "")
                  + f"  {v.message}" + (f"  [{tags}]" if tags else "") + ("  (pruned)" if v.pruned else ""))
    elif action == "show":
        print_json(asdict(reg.get(args.model, args.ref)))
    elif action == "diff":
        print_json(reg.diff(args.model, args.ref, args.to))
    elif action == "alias":
        print_json({args.alias: reg.set_alias(args.model, args.alias, args.ref)})
    elif action == "rollback":
        print_json({"rolled_back_to": reg.rollback(args.model, args.ref), "aliases": reg.aliases(args.model)})
    elif action == "revert":
        print_json(asdict(reg.revert(args.model, args.ref, author=args.author)))
    elif action == "export":
        print(export_version(reg, args.model, args.ref, args.out))
    elif action == "verify":
        problems = verify(reg)
        print("\n".join(problems) if problems else "ok: every manifest, alias and blob is sound")
        if problems:
            raise SystemExit(1)
    elif action == "prune":
        print_json({"pruned": reg.prune(args.model, args.keep_last, args.keep_every),
                    "kept": [v.id for v in reg.versions(args.model) if not v.pruned]})
    elif action == "gc":
        print_json(gc(reg, grace_seconds=args.grace))


def add_registry_parser(sub) -> None:
    p = sub.add_parser("registry", help="versioned model registry (log, show, diff, alias, rollback, ...)")
    p.add_argument("action", choices=["create", "log", "show", "diff", "alias", "rollback", "revert", "export",
                                      "verify", "prune", "gc"],
                   help="create a model; log its versions; show, diff, export one; move an alias; roll back or "
                        "revert; verify the blobs; prune old versions' weights; gc unreferenced blobs")
    p.add_argument("ref", nargs="?", default="latest", help="version (v3) or alias")
    default = os.environ.get("CRISPEDIT_REGISTRY_ROOT") or str(crispedit_home() / "registry")
    p.add_argument("--root", default=default, help=f"the registry folder (default: CRISPEDIT_REGISTRY_ROOT, as the "
                                                 f"service reads it; here {default})")
    p.add_argument("--model", help="registered model name")
    p.add_argument("--base", default="smollm2", help="create: base checkpoint (bundled name or folder)")
    p.add_argument("--to", help="diff: the second version")
    p.add_argument("--alias", help="alias: the alias to move to REF")
    p.add_argument("--out", help="export: output folder")
    p.add_argument("--author", default="", help="recorded as the author of the versions this command writes")
    p.add_argument("--keep-last", type=int, default=50, help="prune: keep the weights of the last N versions (and "
                                                               "of v0 and every aliased one)")
    p.add_argument("--keep-every", type=int, default=0, help="prune: also keep every N-th version (0: none)")
    p.add_argument("--grace", type=float, default=3600.0, help="gc: keep unreferenced blobs younger than this (s)")
    p.set_defaults(func=cmd)
