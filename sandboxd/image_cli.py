"""`sandboxd image`: build images from specs, list, inspect, remove and prune them, save and load
them as OCI layouts, push them to and pull them from registries."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

EXIT_FAILED = 1
EXIT_USAGE = 2
CREDENTIALS_HELP = """credentials: SANDBOXD_REGISTRY_USERNAME and SANDBOXD_REGISTRY_PASSWORD, else the
registry's entry in SANDBOXD_AUTH_FILE (default ~/.config/sandboxd/auth.json), in the format
of Docker's, podman's and skopeo's auth files: {"auths": {"HOST[:PORT]": {"auth": "<base64 user:pass>"}}}"""


def add_image_parser(subparsers: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    image = subparsers.add_parser("image", help="build, list, inspect, remove and prune images")
    if not isinstance(image, parser_class):
        raise TypeError(f"the sub-commands build {type(image).__name__}, not {parser_class.__name__}")
    commands = image.add_subparsers(dest="image_command", required=True, parser_class=parser_class)
    build = commands.add_parser("build", help="build an image from a spec (a Dockerfile subset)")
    build.add_argument("-t", "--tag", required=True, metavar="NAME[:TAG]", help="the image's name")
    build.add_argument("-f", "--file", type=Path, metavar="SPEC",
                       help="the spec (default: CONTEXT/Imagefile, else CONTEXT/Dockerfile)")
    build.add_argument("context", type=Path, help="the build context: COPY reads from here only")
    listing = commands.add_parser("ls", help="list images")
    listing.add_argument("--json", action="store_true")
    inspect = commands.add_parser("inspect", help="print an image's record as JSON")
    inspect.add_argument("name")
    remove = commands.add_parser("rm", help="remove an image's name (prune frees its layers)")
    remove.add_argument("name")
    commands.add_parser("prune", help="remove layers, records and build cache no name reaches")
    save = commands.add_parser("save", help="write an image as an OCI image layout tar")
    save.add_argument("name")
    save.add_argument("file", type=Path)
    load = commands.add_parser("load", help="read an OCI image layout tar (sandboxd's, skopeo's, umoci's)")
    load.add_argument("file", type=Path)
    load.add_argument("-t", "--tag", metavar="NAME[:TAG]", help="name it (default: the layout's ref.name)")
    push = commands.add_parser("push", help="push an image to a registry",
                               epilog=CREDENTIALS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    push.add_argument("name", help="the local image")
    push.add_argument("reference", metavar="REF", help="REGISTRY[:PORT]/PATH[:TAG]")
    push.add_argument("--chunk-size", default="16m", metavar="SIZE",
                      help="blobs larger than this are uploaded in chunks of it (default 16m)")
    pull = commands.add_parser("pull", help="pull an image from a registry",
                               epilog=CREDENTIALS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    pull.add_argument("reference", metavar="REF", help="[REGISTRY[:PORT]/]PATH[:TAG][@sha256:DIGEST]")
    pull.add_argument("-t", "--tag", metavar="NAME[:TAG]", help="name it (default: REF, with its registry)")
    for command in (push, pull):
        command.add_argument("--insecure", action="store_true",
                             help="plain HTTP to a registry that is not on loopback (loopback always is)")
    for command in (build, listing, inspect, remove, commands.choices["prune"], save, load, push, pull):
        command.add_argument("--state-dir", type=Path, help="where images live (default: see README)")


def run_image_command(args: argparse.Namespace) -> int:
    from sandboxd.images.auth import CredentialsError
    from sandboxd.images.build import BuildError, build_image, read_spec, utc_now
    from sandboxd.images.oci import OciError, load_image, save_image
    from sandboxd.images.reference import ReferenceError, remote_reference
    from sandboxd.images.registry import RegistryError
    from sandboxd.images.spec import SpecError
    from sandboxd.images.store import ImageStore, ImageStoreError
    from sandboxd.state import default_state_dir
    from sandboxd.units import UnitError, parse_size_bytes

    state_dir = args.state_dir or default_state_dir()
    store = ImageStore(state_dir)
    try:
        if args.image_command == "build":
            spec_path = args.file or next((args.context / name for name in ("Imagefile", "Dockerfile")
                                           if (args.context / name).is_file()), args.context / "Imagefile")
            if not args.context.is_dir():
                print(f"sandboxd: error: the build context {args.context} is not a directory", file=sys.stderr)
                return EXIT_USAGE
            spec, spec_name = read_spec(spec_path)
            build_image(spec, spec_name, args.context, args.tag, state_dir)
        elif args.image_command == "ls":
            images = store.list_images()
            if args.json:
                json.dump([{"name": name, "id": image_id, "base": record.base, "created": record.created,
                            "layers": len(record.layers), "size_bytes": sum(l.size_bytes for l in record.layers)}
                           for name, image_id, record in images], sys.stdout)
                sys.stdout.write("\n")
            else:
                print(f"{'NAME':40} {'ID':19} {'BASE':8} {'LAYERS':>6} {'SIZE':>12}  CREATED")
                for name, image_id, record in images:
                    size = sum(layer.size_bytes for layer in record.layers)
                    print(f"{name:40} {image_id[:19]:19} {record.base:8} {len(record.layers):>6} {size:>12}  "
                          f"{record.created}")
        elif args.image_command == "inspect":
            image_id, record = store.resolve(args.name)
            document = json.loads(record.to_json())
            document["id"] = image_id
            json.dump(document, sys.stdout, indent=2)
            sys.stdout.write("\n")
        elif args.image_command == "rm":
            print(store.remove(args.name))
        elif args.image_command == "save":
            print(save_image(store, args.name, args.file))
        elif args.image_command == "push":
            from sandboxd.images.push import push_image
            asyncio.run(push_image(store, args.name, remote_reference(args.reference), sys.stdout,
                                   insecure=args.insecure, chunk_bytes=parse_size_bytes(args.chunk_size)))
        elif args.image_command == "pull":
            from sandboxd.images.pull import pull_image

            asyncio.run(pull_image(store, remote_reference(args.reference), sys.stdout, name=args.tag,
                                   insecure=args.insecure, created_fallback=utc_now()))
        elif args.image_command == "load":
            name, image_id = load_image(store, args.file, args.tag, utc_now())
            print(f"Loaded {name} {image_id}")
        else:
            for diff_id in store.prune():
                print(f"removed layer {diff_id}")
    except (ImageStoreError, SpecError, OciError, ReferenceError, CredentialsError, UnitError) as error:
        print(f"sandboxd: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except RegistryError as error:
        print(f"sandboxd: registry: {error}", file=sys.stderr)
        return EXIT_FAILED
    except BuildError as error:
        print(f"sandboxd: build failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as error:
        print(f"sandboxd: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    return 0
