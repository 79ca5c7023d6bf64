"""The commands: typed arguments in, an exit code (`consumer.exitcodes`) out.

One module per command family; each holds the command's flags
(`add_arguments`), its arguments as a frozen dataclass built from the parsed
flags (`from_namespace`, the only place that reads an `argparse.Namespace`),
and the command itself, which orchestrates the domain modules and prints:

    render.py      `render` (dry run of one event) and `check` (routes, schemas, examples)
    dlq.py         `dlq replay`: republish dead letters to their source topic
    publish.py     `publish`: domain events onto a topic
    quickstart.py  `quickstart`: the whole product on one machine
    health.py      `health`: probe a running service (exec probes)

`consumer.cli` is the edge above them: the parser tree, the settings flags,
signal handling and the translation of exceptions into exit codes. `run` and
`webhooks` need no module here (`service.run_service`, `feedback.run_webhooks`
take settings only), and the sandbox, a product of its own, keeps its flags in
`consumer.sandbox.cli`. The domain modules below (`prepare`, `deadletter`,
`publish`, ...) never see argparse, and nothing but `cli` imports a command.
"""
