"""The Ray layer: thin programs that spread persona_core's work over a cluster.

Control flows one way: command line -> config -> plan -> stages -> library.

* `cli`: the `persona-jobs` console script, one subcommand per module below; `flags`: every
  subcommand's flags as overrides of the one config schema (`persona_core.run.config`).
* `stages`: the pipeline's stages in order, each anything with `run(plan) -> Summary`:
  `calibrate`, the masks stage (`build_masks`, then `learn_masks`), `evaluate`, `report`.
* `execute`: the one loop that runs a plan's stages (preflight first, the manifest last), for
  `pipeline` (`persona-jobs run`) and `nightly`; the standalone subcommands run one stage each.
* `dispatch`: actor pools and task queues; `common`: joining Ray, preflight, CLI conventions.
* `submit`, `status`, `jobs_api`: running any subcommand on a cluster through the Ray Jobs API.
* `catalog`, `stats`: inspecting catalogs and stored statistics.
"""
