"""A rule with a directory output (ctx.actions.declare_directory), run as one action."""

def _gen_tree_impl(ctx):
    out = ctx.actions.declare_directory(ctx.attr.name)
    ctx.actions.run_shell(
        outputs = [out],
        inputs = [ctx.file.src],
        command = """
set -eu
d="$1"; src="$2"
mkdir -p "$d/sub/deeper" "$d/bin"
cp "$src" "$d/copy.txt"
printf 'leaf\\n' > "$d/sub/deeper/leaf.txt"
i=0
while [ $i -lt 20 ]; do printf 'file %s\\n' $i > "$d/sub/f$i.txt"; i=$((i+1)); done
printf '#!/bin/sh\\necho tool\\n' > "$d/bin/tool.sh"
chmod 0755 "$d/bin/tool.sh"
: > "$d/empty.txt"
""",
        arguments = [out.path, ctx.file.src.path],
        mnemonic = "GenTree",
        progress_message = "Generating tree %s" % out.short_path,
    )
    return [DefaultInfo(files = depset([out]))]

gen_tree = rule(
    implementation = _gen_tree_impl,
    attrs = {"src": attr.label(allow_single_file = True, mandatory = True)},
)
