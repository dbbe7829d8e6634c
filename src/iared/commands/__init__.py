"""The commands of `iared` (CLI subcommands, and the comparisons the benchmarks run).

The engine (`data`, `backbones`, `reduction`, `training`, `evaluation`) computes; the
modules here load what a command names, call the engine and write the result files.
`compare_methods` is the one comparison every command and benchmark script uses.
"""
