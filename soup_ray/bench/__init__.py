"""Benchmark machinery: load generation, host figures, the serving benchmark and the soup-cost replay.

Imported only by ``soup-ray bench`` and the scripts under ``bench/``; the rest
of the package never imports it.
"""
