# oxqcow — build, test, demo, install.
# `make` builds everything; `make test` runs every check CI runs.

PREFIX ?= /usr/local
CARGO ?= cargo
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
SOMAJOR := 0
TARGET := target/release
BUILD := build
TESTDIR ?= $(BUILD)/tmp

# The C side: tests, header check, install check (see README "C ABI").
CC ?= cc
CXX ?= c++
CTEST := $(BUILD)/c-tests
LIBLINK := $(BUILD)/lib
C_WARN := -Wall -Wextra -Werror
C_FLAGS := -std=c99 -D_GNU_SOURCE $(C_WARN) -O1 -g -Iinclude -Ic-tests
CXX_FLAGS := -std=c++11 $(C_WARN) -O1 -g -Iinclude
# liboxqcow.so's soname is liboxqcow.so.0: the tests find it through links in
# $(LIBLINK) (rpath), so they run against target/release without installing.
SO_LINK := -L$(LIBLINK) -loxqcow -Wl,-rpath,$(abspath $(LIBLINK))
# What a static Rust library needs from the system (rustc --print native-static-libs).
STATIC_LIBS := -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
C_TESTS := test_api test_errors test_block_status test_031 test_036 test_039 test_061 test_features test_check test_snapshot test_compressed test_threads
C_PROGS := $(addprefix $(CTEST)/,$(C_TESTS) test_static test_cxx)
C_DEPS := include/block_int.h c-tests/harness.h c-tests/qcow2hdr.h

.PHONY: all lib tool test unit-tests fmt-check clippy doc-check demo install clean \
	c-tests header-check install-check nbdkit-plugin preload nbd-tests preload-tests

all: lib tool nbdkit-plugin preload

lib tool:
	$(CARGO) build --release

test: all fmt-check clippy unit-tests doc-check header-check c-tests install-check \
	nbd-tests preload-tests
	@echo "== all tests passed"

unit-tests:
	mkdir -p $(TESTDIR)
	OXQCOW_TEST_DIR=$(abspath $(TESTDIR)) OXQCOW_BIN=$(abspath $(TARGET)/oxqcow) \
		$(CARGO) test --release -- --test-threads=2

fmt-check:
	$(CARGO) fmt --check

clippy:
	$(CARGO) clippy --release --all-targets -- -D warnings

doc-check:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --quiet

# ---- C tests ----------------------------------------------------------------------------

$(LIBLINK)/liboxqcow.so.0: $(TARGET)/liboxqcow.so
	@mkdir -p $(LIBLINK)
	ln -sf $(abspath $(TARGET))/liboxqcow.so $(LIBLINK)/liboxqcow.so.0
	ln -sf liboxqcow.so.0 $(LIBLINK)/liboxqcow.so

$(TARGET)/liboxqcow.so $(TARGET)/liboxqcow.a: lib

$(CTEST)/qcow2tool: c-tests/qcow2tool.c c-tests/qcow2hdr.h
	@mkdir -p $(CTEST)
	$(CC) $(C_FLAGS) -o $@ c-tests/qcow2tool.c

$(CTEST)/test_%: c-tests/test_%.c $(C_DEPS) $(LIBLINK)/liboxqcow.so.0
	@mkdir -p $(CTEST)
	$(CC) $(C_FLAGS) -o $@ $< $(SO_LINK) -lpthread

$(CTEST)/test_static: c-tests/test_static.c $(C_DEPS) $(TARGET)/liboxqcow.a
	@mkdir -p $(CTEST)
	$(CC) $(C_FLAGS) -o $@ $< $(TARGET)/liboxqcow.a $(STATIC_LIBS)

$(CTEST)/test_cxx: c-tests/test_cxx.cc include/block_int.h $(LIBLINK)/liboxqcow.so.0
	@mkdir -p $(CTEST)
	$(CXX) $(CXX_FLAGS) -o $@ $< $(SO_LINK)

# Runs every C test program; the last line is "N passed, N failed".
c-tests: lib $(CTEST)/qcow2tool $(C_PROGS)
	@rm -rf $(CTEST)/tmp && mkdir -p $(CTEST)/tmp
	@OXQCOW_TEST_DIR=$(abspath $(CTEST)/tmp) QCOW2TOOL=$(abspath $(CTEST)/qcow2tool) \
		c-tests/run.sh $(C_PROGS)

# The committed header equals a fresh generation, compiles as C99 and C++,
# and the library exports exactly what the header and the version script list.
header-check: lib
	@CARGO="$(CARGO)" CC="$(CC)" CXX="$(CXX)" BUILD="$(BUILD)" TARGET="$(TARGET)" c-tests/header-check.sh

# `make install` into a temporary prefix, then a host built with pkg-config.
install-check: all
	@MAKE="$(MAKE)" CC="$(CC)" BUILD="$(BUILD)" c-tests/install-check.sh

# oxqcow against QEMU's qcow2 driver, side by side (scripts/bench.py; no
# assertions), then qemu-nbd against nbdkit + our plugin over NBD (scripts/bench_nbd.py).
# BENCH_SCALE=small for a quick run, BENCH_REPS=N repetitions, BENCH_NBD=0 (skip the
# NBD section) or BENCH_NBD=only.
bench: all
	python3 scripts/bench.py

.PHONY: bench

# The fuzz campaign against hostile images (examples/fuzz.rs; README "Fuzzing hostile
# images"). FUZZ_SECONDS (default 600), FUZZ_SEED (default 1), FUZZ_ARGS for more
# (e.g. --qemu-check, --kinds luks,bitmaps, --drivers cli). Exits 1 on a finding.
FUZZ_SECONDS ?= 600
FUZZ_SEED ?= 1
# Built with the `fuzz` profile (release + overflow checks): the tool it drives too.
fuzz:
	$(CARGO) build --profile fuzz --bin oxqcow --example fuzz
	target/fuzz/examples/fuzz --seconds $(FUZZ_SECONDS) --seed $(FUZZ_SEED) \
		--dir $(abspath $(BUILD))/fuzz $(FUZZ_ARGS)

.PHONY: fuzz

# ---- C hosts: the nbdkit plugin and the LD_PRELOAD shim ------------------------------
# Built on the public C ABI only (README "nbdkit plugin", "LD_PRELOAD shim"). Both sit
# next to liboxqcow.so.0 in $(LIBLINK) with the layout `make install` gives them, so
# the same relative rpath ($$ORIGIN) finds the library in the tree and installed.

NBDKIT_PLUGIN := $(LIBLINK)/nbdkit/plugins/nbdkit-oxqcow-plugin.so
PRELOAD_SO := $(LIBLINK)/liboxqcow-preload.so
# nbdkit's plugin directory relative to nbdkit's own prefix (Debian:
# lib/x86_64-linux-gnu/nbdkit/plugins), placed under PREFIX: with PREFIX=/usr
# `nbdkit oxqcow` finds the plugin by name. Evaluated only by `make install`.
NBDKIT_PLUGINDIR_REL = $(shell nbdkit --dump-config 2>/dev/null | awk -F= \
	'$$1 == "bindir" { p = $$2; sub("/bin$$", "", p) } $$1 == "plugindir" { d = $$2 } \
	END { if (d != "" && index(d, p "/") == 1) print substr(d, length(p) + 2); \
	      else print "lib/nbdkit/plugins" }')
NBDKIT_PLUGINDIR ?= $(PREFIX)/$(NBDKIT_PLUGINDIR_REL)
HOST_CFLAGS := -std=gnu11 -D_GNU_SOURCE $(C_WARN) -O2 -g -fPIC -Iinclude
PRELOAD_SRC := preload/core.c preload/io.c preload/stat.c preload/stdio.c
HOSTTEST := $(BUILD)/host-tests

nbdkit-plugin: $(NBDKIT_PLUGIN)
preload: $(PRELOAD_SO)

$(NBDKIT_PLUGIN): nbdkit/oxqcow.c include/block_int.h $(LIBLINK)/liboxqcow.so.0
	@mkdir -p $(dir $@)
	$(CC) $(HOST_CFLAGS) $$(pkg-config --cflags nbdkit 2>/dev/null) -shared -o $@ \
		nbdkit/oxqcow.c -L$(LIBLINK) -loxqcow -Wl,-rpath,'$$ORIGIN/../..:$$ORIGIN/../../..'

$(PRELOAD_SO): $(PRELOAD_SRC) preload/preload.h include/block_int.h $(LIBLINK)/liboxqcow.so.0
	$(CC) $(HOST_CFLAGS) -fvisibility=hidden -shared -o $@ $(PRELOAD_SRC) \
		-L$(LIBLINK) -loxqcow -ldl -lpthread -Wl,-rpath,'$$ORIGIN' -Wl,-z,defs

$(HOSTTEST)/preload_calls: host-tests/preload_calls.c
	@mkdir -p $(HOSTTEST)
	$(CC) -std=gnu11 $(C_WARN) -O1 -g -o $@ $< -lpthread

# qemu-io, qemu-img, nbdinfo and nbdcopy against `nbdkit oxqcow` (host-tests/nbd.sh).
nbd-tests: $(NBDKIT_PLUGIN)
	@OXQCOW_TEST_DIR=$(abspath $(HOSTTEST)) host-tests/nbd.sh $(NBDKIT_PLUGIN)

# cat, dd, cp, cmp, od, wc, stat, sha256sum, python3, mkfs.ext4 and preload_calls
# under LD_PRELOAD=liboxqcow-preload.so (host-tests/preload.sh).
preload-tests: $(PRELOAD_SO) $(HOSTTEST)/preload_calls
	@OXQCOW_TEST_DIR=$(abspath $(HOSTTEST)) host-tests/preload.sh $(PRELOAD_SO) \
		$(HOSTTEST)/preload_calls

demo: all $(LIBLINK)/liboxqcow.so.0
	@mkdir -p $(BUILD)/demo
	@rm -f $(BUILD)/demo/*
	@head -c 3000000 /dev/urandom > $(BUILD)/demo/data.raw
	$(TARGET)/oxqcow create -f qcow2 -o lazy_refcounts=on $(BUILD)/demo/disk.qcow2 64M
	$(TARGET)/oxqcow convert -p -f raw -O qcow2 -o lazy_refcounts=on $(BUILD)/demo/data.raw $(BUILD)/demo/disk.qcow2
	$(TARGET)/oxqcow info $(BUILD)/demo/disk.qcow2
	qemu-img check $(BUILD)/demo/disk.qcow2
	qemu-img compare -f raw -F qcow2 $(BUILD)/demo/data.raw $(BUILD)/demo/disk.qcow2
	$(CC) $(C_FLAGS) -o $(BUILD)/demo/demo_host examples/demo_host.c $(SO_LINK)
	$(BUILD)/demo/demo_host $(BUILD)/demo/host.qcow2
	qemu-img check $(BUILD)/demo/host.qcow2

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/lib/pkgconfig
	install -m 755 $(TARGET)/oxqcow $(DESTDIR)$(PREFIX)/bin/oxqcow
	install -m 755 $(TARGET)/liboxqcow.so $(DESTDIR)$(PREFIX)/lib/liboxqcow.so.$(VERSION)
	ln -sf liboxqcow.so.$(VERSION) $(DESTDIR)$(PREFIX)/lib/liboxqcow.so.$(SOMAJOR)
	ln -sf liboxqcow.so.$(SOMAJOR) $(DESTDIR)$(PREFIX)/lib/liboxqcow.so
	install -m 644 $(TARGET)/liboxqcow.a $(DESTDIR)$(PREFIX)/lib/liboxqcow.a
	install -m 644 include/block_int.h $(DESTDIR)$(PREFIX)/include/block_int.h
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(VERSION)|' oxqcow.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/oxqcow.pc
	install -d $(DESTDIR)$(NBDKIT_PLUGINDIR)
	install -m 755 $(NBDKIT_PLUGIN) $(DESTDIR)$(NBDKIT_PLUGINDIR)/nbdkit-oxqcow-plugin.so
	install -m 755 $(PRELOAD_SO) $(DESTDIR)$(PREFIX)/lib/liboxqcow-preload.so

clean:
	$(CARGO) clean
	rm -rf $(BUILD)

# ---- QEMU's qemu-iotests with `oxqcow io` as qemu-io (README "qemu-iotests") --------------
# The tests come from Debian's qemu source package (apt-get source), cached
# under build/iotests/src. `make iotests`: baseline with QEMU's qemu-io, then
# ours; the last line is "N passed, N failed, N not run". The all-oxqcow mode
# runs oxqcow as qemu-img too. `make test` runs `make iotests-ci`: both modes
# over the whole list, `oxqcow io` again with cache=none (O_DIRECT; baseline
# and ours) and the NBD run (all of `make iotests` and more, about 7 minutes on
# 2 cores); each fails on a failure its known-failures list does not explain. `make iotests-quick`: the fixed fast
# subset, ours only.
# `make iotests-nbd` (also run by `make iotests` and `make test`):
# `check -raw -nbd -g quick` with nbdkit/qemu-nbd-wrapper as QEMU_NBD_PROG,
# qemu-nbd baseline then nbdkit + our plugin (README "qemu-iotests over NBD").
.PHONY: iotests iotests-nbd iotests-full-oxqcow iotests-quick iotests-ci
iotests: tool nbdkit-plugin
	scripts/iotests.sh
	IOTESTS_NBD=1 scripts/iotests.sh
iotests-nbd: tool nbdkit-plugin
	IOTESTS_NBD=1 scripts/iotests.sh
iotests-full-oxqcow: tool
	IOTESTS_IMG=oxqcow scripts/iotests.sh
iotests-quick: tool
	IOTESTS_SUBSET=1 scripts/iotests.sh
iotests-ci: tool nbdkit-plugin
	scripts/iotests.sh
	IOTESTS_IMG=oxqcow IOTESTS_REUSE_BASELINE=1 scripts/iotests.sh
	IOTESTS_CACHE=none scripts/iotests.sh
	IOTESTS_NBD=1 scripts/iotests.sh
test: iotests-ci
