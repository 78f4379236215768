"""Fine-grained performance model of distributed language-model training (`orchestrator profile | plan`).

Spec: ../shared/papers/methods_nas_gen_llm.md section 10 (Zhang et al., arXiv 2509.22832): decompose a training
step into operators, micro-benchmark each operator on the hardware, fit one regressor per operator, and compose the
predictions through the parallel layout (tensor, pipeline and data parallelism, ZeRO) into a step time.

    workload.py   Workload (model sizes, batch, layout, ZeRO, precision) from an experiment file; memory per device
    ops.py        the operators of one training step of trainers/lm.py, with their shapes and counts
    microbench.py timing of one operator (compute ops in this process, collectives across Ray actors)
    profile.py    `orchestrator profile`: the sampling grid -> a Parquet table tagged with the hardware
    regress.py    per-operator regressors (roofline, random forest, forest on the roofline's residual)
    compose.py    per-layer, per-stage, pipeline (1F1B) and data-parallel composition -> step time
    plan.py       `orchestrator plan`: every layout for N devices, ranked; the best as an override; MLflow
"""
