# oxqcow — build, test, demo, install.
# `make` builds everything; `make test` runs every check CI runs.

PREFIX ?= /usr/local
CARGO ?= cargo
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
SOMAJOR := 0
TARGET := target/release
BUILD := build
TESTDIR ?= $(BUILD)/tmp

.PHONY: all lib tool test unit-tests fmt-check clippy doc-check demo install clean

all: lib tool

lib tool:
	$(CARGO) build --release

test: all fmt-check clippy unit-tests doc-check
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

demo: all
	@mkdir -p $(BUILD)/demo
	@rm -f $(BUILD)/demo/*
	@head -c 3000000 /dev/urandom > $(BUILD)/demo/data.raw
	$(TARGET)/oxqcow create -f qcow2 -o lazy_refcounts=on $(BUILD)/demo/disk.qcow2 64M
	$(TARGET)/oxqcow convert -p -f raw -O qcow2 -o lazy_refcounts=on $(BUILD)/demo/data.raw $(BUILD)/demo/disk.qcow2
	$(TARGET)/oxqcow info $(BUILD)/demo/disk.qcow2
	qemu-img check $(BUILD)/demo/disk.qcow2
	qemu-img compare -f raw -F qcow2 $(BUILD)/demo/data.raw $(BUILD)/demo/disk.qcow2

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/lib/pkgconfig
	install -m 755 $(TARGET)/oxqcow $(DESTDIR)$(PREFIX)/bin/oxqcow
	install -m 755 $(TARGET)/liboxqcow.so $(DESTDIR)$(PREFIX)/lib/liboxqcow.so.$(VERSION)
	ln -sf liboxqcow.so.$(VERSION) $(DESTDIR)$(PREFIX)/lib/liboxqcow.so.$(SOMAJOR)
	ln -sf liboxqcow.so.$(SOMAJOR) $(DESTDIR)$(PREFIX)/lib/liboxqcow.so
	install -m 644 $(TARGET)/liboxqcow.a $(DESTDIR)$(PREFIX)/lib/liboxqcow.a
	install -m 644 include/block_int.h $(DESTDIR)$(PREFIX)/include/block_int.h
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(VERSION)|' oxqcow.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/oxqcow.pc

clean:
	$(CARGO) clean
	rm -rf $(BUILD)
