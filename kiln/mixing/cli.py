"""`kiln mix ...`: the scaling-law mixture optimizer.

    kiln mix design   --availability A.json --target-tokens N --out plan.csv       proxy mixtures (RegMix draws)
    kiln mix run      plan.csv --shards SHARDS --output runs/                     train the proxies -> runs.csv
    kiln mix fit      runs.csv --weights 'w_*' --target val_mean --out fit.json   law / linear / gbm, CV, bootstrap
    kiln mix predict  fit.json mixtures.csv --out pred.csv                       predicted loss with intervals
    kiln mix optimize fit.json --availability A.json --target-tokens N --out mix.toml
    kiln mix almr     grid.csv --ratio-col ratio --lr-col lr --target loss        extra-language ratio x LR study
    kiln mix cmr      runs.csv --ratio-col ratio --tokens-col tokens --target loss --tolerance 0.02
    kiln mix report   fit.json --runs runs.csv --availability A.json --target-tokens N --out report/
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    mix = sub.add_parser("mix", help="mixture optimizer: design proxies, fit a mixing law, optimize under caps",
                         description="Choose a data mixture the way Llama 3 did: train small proxies on "
                                     "several mixtures, fit how loss depends on the weights, and pick the "
                                     "best mixture under token-availability caps.",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    cmds = mix.add_subparsers(dest="mix_command", required=True)

    p = cmds.add_parser("design", help="propose K proxy mixtures around the natural distribution",
                        description="Dirichlet draws with a log-uniform concentration around the natural token "
                                    "distribution of availability.json (RegMix), run p000 the natural mixture "
                                    "itself, every row within the caps weight x target tokens <= available x "
                                    "max epochs. Default K = 3(m+1) (Olmix's minimum for m domains).")
    p.add_argument("--availability", required=True, help="availability.json (kiln curate tokenize)")
    p.add_argument("--target-tokens", type=float, required=True, help="tokens of the run the mixture is for")
    p.add_argument("--k", type=int, help="number of proxy runs, the natural one included (default 3(m+1))")
    p.add_argument("--max-epochs", type=float, help="cap: at most this many passes over any domain")
    p.add_argument("--min-weight", type=float, default=0.0, help="floor for every domain's weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="runs plan (CSV, or .parquet)")

    p = cmds.add_parser("run", help="train the planned proxies (resumable) and write the runs table",
                        description="Train one small model per plan row with kiln's trainer on the token shards; "
                                    "finished runs are skipped. Writes OUTPUT/runs.csv: weights, val_<domain> "
                                    "losses, val_mean, bpb_<domain>, params, tokens, seed.")
    p.add_argument("plan", help="runs plan from kiln mix design")
    p.add_argument("--shards", required=True, help="token shards directory")
    p.add_argument("--output", required=True, help="directory for the runs and runs.csv")
    p.add_argument("--tokenizer", default="", help="tokenizer directory (for bits per byte)")
    p.add_argument("--preset", default="debug", help="proxy model preset (default debug)")
    p.add_argument("--tokens", type=int, default=100_000, help="training tokens per proxy (default 100000)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)

    p = cmds.add_parser("fit", help="fit the target as a function of the mixture weights",
                        description="Any CSV/Parquet runs table: weight columns by a glob (rows are renormalized "
                                    "when they do not sum to 1, and the count is said), the target by column name "
                                    "or several weighted ('val_a:0.5,val_b:0.5'). Methods: law (Data Mixing Law, "
                                    "Huber loss, multi-start L-BFGS), linear, gbm (LightGBM, as RegMix); k-fold CV "
                                    "prints Spearman rho and MAE and auto picks by it; bootstrap ensembles give "
                                    "prediction intervals.")
    p.add_argument("runs", help="runs table (CSV or Parquet)")
    p.add_argument("--weights", required=True, metavar="GLOB", help="weight columns, e.g. 'w_*'")
    p.add_argument("--target", required=True, help="target column, or 'col:weight,col:weight'")
    p.add_argument("--method", default="auto", choices=["auto", "law", "linear", "gbm"])
    p.add_argument("--bootstrap", type=int, default=50, help="bootstrap resamples for intervals (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale-column", metavar="COL",
                   help="scale mode: fit the law at each value of COL (model size or tokens) and extrapolate its "
                        "parameters, linear in log scale, to --target-scale")
    p.add_argument("--target-scale", type=float, help="scale mode: the model size / token count to predict at")
    p.add_argument("--out", required=True, help="FIT.json")

    p = cmds.add_parser("predict", help="predicted target (and interval) for a table of mixtures")
    p.add_argument("fit", help="FIT.json")
    p.add_argument("mixtures", help="CSV/Parquet with the fit's weight columns")
    p.add_argument("--weights", metavar="GLOB", help="weight columns if not named like the fit's")
    p.add_argument("--level", type=float, default=0.9, help="interval level (default 0.9)")
    p.add_argument("--out", required=True, help="output CSV: the same rows plus predicted, lower, upper")

    p = cmds.add_parser("optimize", help="the best mixture under token caps, as a mixture file",
                        description="Minimize the fit's prediction over the simplex with caps weight x target "
                                    "tokens <= available x max epochs, optionally pulled toward the natural "
                                    "distribution (--kl-weight). Writes a contract-4 mixture TOML with the "
                                    "predicted loss, its interval and provenance.")
    p.add_argument("fit", help="FIT.json")
    p.add_argument("--availability", required=True)
    p.add_argument("--target-tokens", type=float, required=True)
    p.add_argument("--max-epochs", type=float)
    p.add_argument("--kl-weight", type=float, default=0.0)
    p.add_argument("--level", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="mixture TOML")

    p = cmds.add_parser("almr", help="extra-language ratio x learning rate study (continual pretraining)",
                        description="Fit loss over a grid of extra-domain ratio x learning rate, report the best "
                                    "learning rate as a function of the ratio (ln lr* = a + b r) and the best "
                                    "pair. With --grid, write the grid of runs to train instead.")
    p.add_argument("table", nargs="?", help="runs table with ratio, learning-rate and target columns")
    p.add_argument("--ratio-col", default="ratio")
    p.add_argument("--lr-col", default="lr")
    p.add_argument("--target", default="loss")
    p.add_argument("--grid", action="store_true", help="write the (ratio, lr) grid to --out instead of fitting")
    p.add_argument("--ratios", help="comma-separated ratios for --grid")
    p.add_argument("--lrs", help="comma-separated learning rates for --grid")
    p.add_argument("--out", help="grid CSV (--grid) or the fitted curve CSV")

    p = cmds.add_parser("cmr", help="critical mixture ratio as a power law in training tokens",
                        description="Per token budget, the largest ratio of a domain that keeps the general loss "
                                    "within --tolerance of its ratio-0 baseline; fitted as r_crit = A x D^s.")
    p.add_argument("table", help="runs table with ratio, tokens and general-loss columns")
    p.add_argument("--ratio-col", default="ratio")
    p.add_argument("--tokens-col", default="tokens")
    p.add_argument("--target", default="loss", help="general-domain loss column")
    p.add_argument("--tolerance", type=float, default=0.01, help="allowed loss increase (nats, or relative)")
    p.add_argument("--relative", action="store_true", help="tolerance as a fraction of the baseline")
    p.add_argument("--at", type=float, help="also predict r_crit at this many tokens")

    p = cmds.add_parser("report", help="PNG plots and a Markdown/HTML report of a fit (and its optimum)")
    p.add_argument("fit", help="FIT.json")
    p.add_argument("--runs", help="runs table the fit came from (predicted vs actual)")
    p.add_argument("--availability", help="with --target-tokens: also optimize and plot the chosen mixture")
    p.add_argument("--target-tokens", type=float)
    p.add_argument("--max-epochs", type=float)
    p.add_argument("--out", required=True, help="report directory")


def _csv_floats(value: str | None, name: str) -> list[float]:
    from kiln.config import ConfigError

    try:
        return [float(x) for x in (value or "").split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{name}: expected comma-separated numbers, got {value!r}") from None


def run(args) -> int:
    from kiln.config import ConfigError

    cmd = args.mix_command
    if cmd == "design":
        from kiln.mixing.design import design, write_plan

        plan = design(args.availability, args.k, target_tokens=int(args.target_tokens), max_epochs=args.max_epochs,
                      seed=args.seed, min_weight=args.min_weight)
        write_plan(plan, args.out)
        print(plan)
        print(f"wrote {args.out}: {plan.height} proxy mixtures")
    elif cmd == "run":
        from kiln.mixing.proxies import ProxyConfig, run_plan

        cfg = ProxyConfig(shards=args.shards, output=args.output, tokenizer=args.tokenizer, preset=args.preset,
                          tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed)
        print(run_plan(args.plan, cfg))
    elif cmd == "fit":
        from kiln.mixing.fit import fit
        from kiln.mixing.table import load_runs

        runs = load_runs(args.runs, args.weights, args.target)
        if bool(args.scale_column) != bool(args.target_scale):
            raise ConfigError("kiln mix fit: scale mode needs both --scale-column and --target-scale")
        if args.scale_column:
            from kiln.mixing.fit import fit_scaling

            if args.method not in ("auto", "law"):
                raise ConfigError("kiln mix fit: scale mode extrapolates the law's parameters; use --method law")
            result = fit_scaling(runs.split(args.scale_column), args.target_scale, n_boot=args.bootstrap,
                                 seed=args.seed)
        else:
            result = fit(runs, method=args.method, n_boot=args.bootstrap, seed=args.seed)
        result.save(args.out)
        print(f"wrote {args.out}: {result.method} fit of {result.target} over {', '.join(result.domains)}")
    elif cmd == "predict":
        from kiln.mixing.fit import Fit, predict_table

        out = predict_table(Fit.load(args.fit), args.mixtures, args.out, level=args.level, weights_glob=args.weights)
        print(out)
        print(f"wrote {args.out}")
    elif cmd == "optimize":
        from kiln.mixing.fit import Fit
        from kiln.mixing.optimize import optimize, write_mixture

        result = optimize(Fit.load(args.fit), args.availability, int(args.target_tokens), max_epochs=args.max_epochs,
                          kl_weight=args.kl_weight, level=args.level, seed=args.seed)
        write_mixture(result, args.out, args.fit)
        print(f"chosen mixture ({result.method} fit of {result.target}):")
        for d, w in sorted(result.weights.items(), key=lambda kv: -kv[1]):
            cap = " (at its cap)" if d in result.active_caps else ""
            print(f"  {d:<16} {w:7.4f}   natural {result.natural.get(d, 0.0):7.4f}{cap}")
        print(f"predicted {result.mean:.4f}, {result.level:.0%} interval [{result.lower:.4f}, {result.upper:.4f}]; "
              f"natural mixture {result.natural_mean:.4f}")
        print(f"wrote {args.out}")
    elif cmd == "almr":
        from kiln.mixing.studies import almr_fit, almr_grid
        from kiln.mixing.table import read_table

        if args.grid:
            if not args.out:
                raise ConfigError("kiln mix almr --grid: --out is required")
            grid = almr_grid(_csv_floats(args.ratios, "--ratios"), _csv_floats(args.lrs, "--lrs"))
            grid.write_csv(args.out)
            print(f"wrote {args.out}: {grid.height} runs")
            return 0
        if not args.table:
            raise ConfigError("kiln mix almr: give a runs table (or --grid to plan one)")
        result = almr_fit(read_table(args.table), args.ratio_col, args.lr_col, args.target)
        print(f"ln lr*(r) = {result.a:.4f} + {result.b:.4f} r   (fit over {result.n_runs} runs, rmse {result.rmse:.4g})")
        print(f"best pair: ratio {result.best_ratio:.4f}, lr {result.best_lr:.3g}, predicted {args.target} "
              f"{result.best_loss:.4f}")
        print(result.curve)
        if args.out:
            result.curve.write_csv(args.out)
    elif cmd == "cmr":
        from kiln.mixing.studies import cmr_fit
        from kiln.mixing.table import read_table

        result = cmr_fit(read_table(args.table), args.ratio_col, args.tokens_col, args.target, args.tolerance,
                         args.relative)
        print(f"r_crit(D) = {result.A:.4g} x D^{result.exponent:.4f}   (R^2 {result.r2:.3f})")
        print(result.budgets)
        if args.at:
            print(f"r_crit at {args.at:.3g} tokens: {float(result.predict(args.at)):.4f}")
    elif cmd == "report":
        from kiln.mixing.fit import Fit
        from kiln.mixing.optimize import optimize
        from kiln.mixing.report import write_report

        fitted = Fit.load(args.fit)
        result = None
        if args.availability and args.target_tokens:
            result = optimize(fitted, args.availability, int(args.target_tokens), max_epochs=args.max_epochs)
        files = write_report(args.out, fitted, runs=args.runs, result=result, availability=args.availability)
        for name, path in files.items():
            print(f"wrote {path}")
    return 0


