"""The objects every API module reaches through the aiohttp application."""

from __future__ import annotations

from aiohttp import web

from blockvirt.jobs.manager import JobManager
from blockvirt.qos.manager import QosManager
from blockvirt.storage.volumes import VolumeManager

VOLUMES = web.AppKey("volumes", VolumeManager)
JOBS = web.AppKey("jobs", JobManager)
#: Absent when the server runs without QoS (never today: `serve` always has it).
QOS = web.AppKey("qos", QosManager)
