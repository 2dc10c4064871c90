"""Shared pytest set-up: offline hubs, one thread per test process on the 2-core CI machine."""
import os
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
