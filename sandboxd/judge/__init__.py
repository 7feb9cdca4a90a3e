"""The online judge: compile a submission once, run it on many tests, check each output.

- `languages`: the catalogue (policies/languages.toml) of how each language is compiled and
  run, under which limits and on which image, with its Judge0 and Piston ids; the jobs of the
  compile-once, run-many pipeline; and `probe_language`, which proves on this machine that a
  language works end to end.
- `checkers`: pure functions deciding whether an output answers a test, Judge0's own rule,
  and the checker specs an API request may name.

Nothing here imports the runtime: jobs are handed to whatever runs them (a `Runtime`, or
the service's launcher), so the service's front end can use this package too.
"""
