"""Built-in plugins, one module per GIE plugin type (found by ``epp.plugins.registry``).

A module here defines classes with a ``type_name``; the registry imports every module of this
package, so adding a plugin is one new file plus one config line.
"""
