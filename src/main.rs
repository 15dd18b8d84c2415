#[global_allocator]
static ALLOC: kiln::memory::CountingAlloc = kiln::memory::CountingAlloc;

fn main() {
    ALLOC.install();
    std::process::exit(kiln::cli::main());
}
