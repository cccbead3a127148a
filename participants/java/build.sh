#!/usr/bin/env bash
# Builds the Java participant with javac against Debian's jars in /usr/share/java
# (librabbitmq-client-java, libmsgpack-java, libzstd-jni-java, libjackson2-databind-java,
# libslf4j-java; junit4 for the tests). Output: build/ (git-ignored).
#   ./build.sh          compile the library and command: build/classes, build/fedq-java.jar
#   ./build.sh test     also compile and run the unit tests (JUnit 4) against docs/
set -euo pipefail
cd "$(dirname "$0")"
JARS=/usr/share/java
CP="$JARS/amqp-client.jar:$JARS/msgpack-core.jar:$JARS/zstd-jni.jar:$JARS/jackson-databind.jar:$JARS/jackson-core.jar:$JARS/jackson-annotations.jar:$JARS/slf4j-api.jar:$JARS/slf4j-nop.jar"
for jar in ${CP//:/ }; do
  [ -f "$jar" ] || { echo "error: $jar is missing (install the Debian packages named in participants/java/README.md)" >&2; exit 1; }
done
command -v javac >/dev/null || { echo "error: javac is missing (install openjdk-17-jdk-headless)" >&2; exit 1; }
rm -rf build/classes build/test-classes
mkdir -p build/classes
javac --release 17 -Xlint:all -Werror -encoding UTF-8 -cp "$CP" -d build/classes $(find src/main/java -name '*.java')
jar --create --file build/fedq-java.jar --main-class io.fedq.participant.Main -C build/classes .
echo "$CP" > build/classpath
if [ "${1:-}" = "test" ]; then
  TCP="build/classes:$CP:$JARS/junit4.jar:$JARS/hamcrest-core.jar"
  mkdir -p build/test-classes
  javac --release 17 -Xlint:all -Werror -encoding UTF-8 -cp "$TCP" -d build/test-classes $(find src/test/java -name '*.java')
  tests=$(cd src/test/java && find . -name '*Test.java' | sed 's|^\./||; s|\.java$||; s|/|.|g' | sort)
  java -Djava.library.path=/usr/lib/x86_64-linux-gnu:/usr/lib/jni -Dfedq.docs="$(cd ../.. && pwd)/docs" \
    -cp "build/test-classes:$TCP" org.junit.runner.JUnitCore $tests
fi
