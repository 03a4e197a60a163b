"""The shipped recipes: the YAML files in this folder (installed as package data; nothing here runs).
`sparsify recipes list` shows them and `sparsify run NAME` runs one."""
