"""``openai-parser``: the request/response parser type named by ``parser: {pluginRef}``.

Parsing itself is request control's (the body is parsed once there); this plugin type exists
so configs naming GIE's default parser validate. Other parsers are not supported yet.
"""

from __future__ import annotations

from epp.scheduling.framework import Plugin


class OpenAIParser(Plugin):
    type_name = "openai-parser"
