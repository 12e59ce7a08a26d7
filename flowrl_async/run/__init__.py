"""The orchestration of a run: start the processes (Ray, or inline), wire their addresses,
drive the step loop, keep the actors healthy, and write what a run leaves behind. Only the
command line (``flowrl_async.cli``) imports this package."""
